"""Opening a committed gallery index and searching it (cosine similarity, best first)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa

from vbatch.operators.index.embeddings import vector_problems
from vbatch.operators.index.indexes import ivf_or_none, search_params
from vbatch.operators.index.node_cache import load_faiss, map_faiss, open_refine
from vbatch.operators.index.refine import RefineVectors
from vbatch.operators.index.refine import rerank as rerank_candidates
from vbatch.operators.index.store import IndexInfo, read_id_map, read_info
from vbatch.operators.storage import Storage


def check_search_options(info: IndexInfo, k: int, nprobe: int | None, rerank: int | None) -> None:
    """Refuse search parameters the gallery of ``info`` cannot take (also on a job's driver,
    before any search actor starts).

    Raises:
        ValueError: ``k < 1``, ``nprobe < 1``, ``rerank < 0``, or ``rerank >= 1`` on a gallery
            without refinement vectors.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if nprobe is not None and nprobe < 1:
        raise ValueError(f"nprobe must be >= 1, got {nprobe}")
    if rerank is not None and rerank < 0:
        raise ValueError(f"rerank must be >= 0, got {rerank}")
    if rerank and not info.refine_parts:
        raise ValueError(f"{info.uri}: no refinement vectors to re-rank with (built without them)")


class GalleryIndex:
    """A loaded gallery index: FAISS index, id map and manifest; safe to search from threads.

    Example::

        gallery = GalleryIndex.open("s3://bucket/reid/index", storage)
        scores, image_ids = gallery.search(query_embeddings, k=10)
    """

    def __init__(
        self,
        index: faiss.Index,
        image_ids: pa.Array,
        info: IndexInfo,
        refine: RefineVectors | None = None,
    ) -> None:
        self.index = index
        self.image_ids = image_ids
        self.info = info
        self.refine = refine
        # built once: searches with the manifest's nprobe (the common case) reuse it
        self._params = search_params(index, info.nprobe)

    @classmethod
    def open(
        cls,
        uri: str,
        storage: Storage,
        mmap: bool = True,
        cache_root: str | Path | None = None,
    ) -> GalleryIndex:
        """Open the index at ``uri`` (the files named by its current manifest).

        Args:
            uri: index folder (local or ``s3://``).
            storage: the storage layer.
            mmap: memory-map the index file read-only from a node-local copy (cached under
                ``cache_root``, ``$VBATCH_CACHE`` or ``~/.cache/vbatch``; a local index is mapped
                in place), so that its codes live in the shared page cache, not in this process's
                heap; ``False`` reads it into memory.
            cache_root: cache folder for downloaded index files.

        The refinement vectors of a gallery that has them are always memory-mapped (cached
        like the index file when remote): they are the part of the gallery kept outside RAM.

        Returns:
            The opened gallery; searches give the same results either way.
        """
        info = read_info(uri, storage)
        if mmap:
            index = map_faiss(info, storage, cache_root)
        else:
            with tempfile.TemporaryDirectory(prefix="vbatch-index-") as tmp:
                index = load_faiss(info, storage, tmp)  # a remote file fetched, read, dropped
        ids = read_id_map(info, storage).column("image_id").combine_chunks()
        ivf = ivf_or_none(index)
        if ivf is not None and info.nprobe:
            ivf.nprobe = info.nprobe
        return cls(index, ids, info, open_refine(info, storage, cache_root))

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(
        self,
        embeddings: np.ndarray,
        k: int = 10,
        nprobe: int | None = None,
        rerank: int | None = None,
    ) -> tuple[np.ndarray, list[list[str | None]]]:
        """The ``k`` most similar gallery images of each query.

        Args:
            embeddings: (Q, D) or (D,) float query embeddings; normalised here (cosine).
            k: neighbours per query.
            nprobe: inverted lists to visit (IVF only); default: the tuned value of the manifest.
            rerank: re-rank the compact index's top ``k x rerank`` with the full-precision
                vectors (exact scores); ``0`` turns it off; default: the manifest's tuned factor
                (none for a gallery without refinement vectors).

        Returns:
            ``(scores (Q, k) float32 cosine similarities, image_ids Q lists of k)``, best first;
            when the index holds fewer than ``k`` reachable vectors the tail is
            ``(-inf, None)``.

        Raises:
            ValueError: ``k < 1``, ``nprobe < 1``, ``rerank < 0``, ``rerank >= 1`` on a gallery
                without refinement vectors, another dimension, or a query that is not finite or
                has zero norm (naming its row).
        """
        check_search_options(self.info, k, nprobe, rerank)
        factor = (self.info.rerank or 1) if rerank is None else rerank
        if self.refine is None:
            factor = 0
        x = np.array(embeddings, dtype=np.float32, ndmin=2, copy=True)
        if x.ndim != 2 or x.shape[1] != self.info.dim:
            raise ValueError(f"queries must be (Q, {self.info.dim}), got {np.shape(embeddings)}")
        bad = [(i, p) for i, p in enumerate(vector_problems(x)) if p is not None]
        if bad:
            # faiss would return no hits for NaN and arbitrary ones for a zero vector
            which = ", ".join(f"{i} ({p})" for i, p in bad[:5])
            raise ValueError(f"{len(bad)} of {len(x)} queries cannot be searched: row {which}")
        faiss.normalize_L2(x)
        params = self._params if nprobe is None else search_params(self.index, nprobe)
        if factor and self.refine is not None:
            _, candidates = self.index.search(x, k * factor, params=params)
            scores, rows = rerank_candidates(x, candidates, self.refine, k)  # exact cosines
        else:
            scores, rows = self.index.search(x, k, params=params)
        if not factor and self.info.metric == "l2":  # unit vectors: |x - y|^2 = 2 - 2 cos
            scores = np.where(rows >= 0, 1.0 - scores / 2.0, -np.inf).astype(np.float32)
        names = self.image_ids.take(pa.array(np.where(rows < 0, 0, rows).ravel())).to_pylist()
        flat_rows = rows.ravel()
        ids = [
            [names[i * k + j] if flat_rows[i * k + j] >= 0 else None for j in range(k)]
            for i in range(len(x))
        ]
        return scores, ids
