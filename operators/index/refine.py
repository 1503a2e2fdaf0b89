"""Re-ranking with full-precision vectors kept on storage beside the index.

Compact codes in RAM find ``k x r`` candidates; their full-precision vectors, stored as ``.npy``
parts (one per generation, rows in faiss-id order) and memory-mapped from the node cache, re-rank
them exactly. This is faiss' ``IndexRefine`` split in two so that the refinement vectors cost page
cache (shared, evictable) instead of heap, and so that ``reid add`` appends a part instead of
rewriting the vectors (DiskANN/Vamana and ScaNN keep full vectors on disk for the same reason:
Subramanya et al., NeurIPS 2019; Guo et al., ICML 2020). Figures: ``docs/BENCHMARKS.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np

REFINE_DTYPES = ("float32", "float16")
# queries re-ranked per step: bounds the gathered candidate vectors to
# 64 x (10 x 16) x 1536 x 4 B = 63 MB, freed (returned to the OS) after each step
RERANK_CHUNK = 64
# a fixed .npy header length (a multiple of 64, as numpy pads it) so that the final row count can
# be written over the provisional one when the part is closed
_HEADER_BYTES = 128
_MAGIC = b"\x93NUMPY\x01\x00"


def _header(rows: int, dim: int, dtype: str) -> bytes:
    text = repr({"descr": np.dtype(dtype).str, "fortran_order": False, "shape": (rows, dim)})
    body_len = _HEADER_BYTES - len(_MAGIC) - 2
    body = text.encode("latin1").ljust(body_len - 1) + b"\n"
    if len(body) != body_len:
        raise ValueError(f"shape ({rows}, {dim}) does not fit a {_HEADER_BYTES}-byte npy header")
    return _MAGIC + body_len.to_bytes(2, "little") + body


class NpyPartWriter:
    """Appends rows to an ``.npy`` file whose length is known only when it is closed.

    Example::

        with NpyPartWriter(path, dim=1536, dtype="float32") as part:
            part.write(vectors)
    """

    def __init__(self, path: str | Path, dim: int, dtype: str = "float32") -> None:
        if dtype not in REFINE_DTYPES:
            raise ValueError(f"refine dtype must be one of {REFINE_DTYPES}, got {dtype!r}")
        self.path, self.dim, self.dtype, self.rows = Path(path), dim, dtype, 0
        self._fh: BinaryIO = open(self.path, "wb")
        self._fh.write(_header(0, dim, dtype))

    def write(self, vectors: np.ndarray) -> None:
        """Append ``(n, dim)`` rows (cast to the part's dtype)."""
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"expected (n, {self.dim}) vectors, got {vectors.shape}")
        self._fh.write(np.ascontiguousarray(vectors, dtype=self.dtype).tobytes())
        self.rows += len(vectors)

    def close(self) -> None:
        if self._fh.closed:
            return
        self._fh.seek(0)
        self._fh.write(_header(self.rows, self.dim, self.dtype))
        self._fh.close()

    def __enter__(self) -> NpyPartWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def npy_shape(path: str | Path) -> tuple[tuple[int, ...], str]:
    """``(shape, dtype name)`` from an ``.npy`` header, without mapping the data."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        if version != (1, 0):
            raise ValueError(f"{path}: unsupported npy version {version}")
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
    if fortran:
        raise ValueError(f"{path}: Fortran-ordered arrays are not refinement vectors")
    return tuple(shape), np.dtype(dtype).name


class RefineVectors:
    """The refinement vectors of a gallery: ``.npy`` parts mapped read-only, rows = faiss ids.

    Args:
        parts: local ``.npy`` files in faiss-id order (mapped, never read into the heap).
    """

    def __init__(self, parts: list[Path]) -> None:
        self.parts = [np.load(p, mmap_mode="r") for p in parts]
        sizes = [len(p) for p in self.parts]
        self.offsets = np.cumsum([0, *sizes])
        self.dim = int(self.parts[0].shape[1]) if self.parts else 0

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def gather(self, ids: np.ndarray) -> np.ndarray:
        """``(len(ids), dim)`` float32 rows of the given faiss ids (all ``>= 0``)."""
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        part_of = np.searchsorted(self.offsets, ids, side="right") - 1
        for p in np.unique(part_of):
            sel = part_of == p
            # sorted row order: page faults follow the file instead of jumping back and forth
            rows = ids[sel] - self.offsets[p]
            order = np.argsort(rows, kind="stable")
            picked = np.empty((len(rows), self.dim), dtype=np.float32)
            picked[order] = self.parts[p][rows[order]]
            out[sel] = picked
        return out


def rerank(
    queries: np.ndarray, candidates: np.ndarray, vectors: RefineVectors, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner products of each query with its candidates; the best ``k``, best first.

    Args:
        queries: (Q, D) float32 unit vectors.
        candidates: (Q, C) faiss ids from the compact index, ``-1`` for none.
        vectors: the refinement vectors.
        k: results per query (``<= C``).

    Returns:
        ``(scores (Q, k) float32, ids (Q, k) int64)``, ``(-inf, -1)`` past the candidates.
    """
    q_n = len(candidates)
    scores = np.full((q_n, k), -np.inf, dtype=np.float32)
    ids = np.full((q_n, k), -1, dtype=np.int64)
    for start in range(0, q_n, RERANK_CHUNK):
        cand = candidates[start : start + RERANK_CHUNK]
        valid = cand >= 0
        # row 0 stands in for missing candidates; their scores are masked below
        gathered = vectors.gather(np.where(valid, cand, 0).ravel()).reshape(*cand.shape, -1)
        dots = np.einsum("qcd,qd->qc", gathered, queries[start : start + len(cand)])
        del gathered
        dots = np.where(valid, dots, -np.inf).astype(np.float32)
        # stable sort on -score: equal scores keep the compact index's order
        order = np.argsort(-dots, axis=1, kind="stable")[:, :k]
        top = np.take_along_axis(dots, order, axis=1)
        top_ids = np.take_along_axis(cand, order, axis=1)
        scores[start : start + len(cand), : top.shape[1]] = top
        ids[start : start + len(cand), : top.shape[1]] = np.where(np.isfinite(top), top_ids, -1)
    return scores, ids
