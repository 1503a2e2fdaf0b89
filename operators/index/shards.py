"""Cutting an embeddings table into shards that are encoded apart and merged into one index.

The same trained index (coarse centroids, codebooks, rotations) encodes every shard, so a
vector's code does not depend on the shard it falls in; the merge appends each shard's inverted
lists in shard order with its ids shifted to the global faiss ids. The merged index is therefore
byte for byte the one a single process builds by adding the whole table in order (tested): the
approach of faiss ``contrib/ondisk.py`` and autofaiss, minus the on-disk inverted lists (the
merged index is written in faiss' in-memory format, which search memory-maps; see
docs/BENCHMARKS.md for why).

Which rows are indexed is decided before any vector is read, from the ``image_id`` column alone:
the first ok row of each image_id, and none already in the index (``reid add``). Each shard gets
its keep-mask and the faiss id of its first kept row.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vbatch.operators.index.embeddings import (
    EmbeddingBatch,
    TableStats,
    iter_embeddings,
    open_parquet,
)
from vbatch.operators.index.indexes import ivf_or_none
from vbatch.operators.index.refine import NpyPartWriter
from vbatch.operators.index.store import ID_MAP_SCHEMA
from vbatch.operators.index.tune import RecallProbe
from vbatch.operators.storage import Storage


@dataclass(frozen=True)
class Shard:
    """A contiguous run of the table's ok rows, ``[lo, hi)`` in ok-row ordinals.

    Attributes:
        number: position among the shards (their id parts and refine parts follow this order).
        files: the Parquet files that hold the run.
        start: ordinal of the first ok row of ``files[0]``.
        lo, hi: the run.
        first_id: faiss id of the run's first indexed row.
        keep: ``(hi - lo,)`` bool, ``False`` for a row not indexed (an image_id seen before).
    """

    number: int
    files: tuple[str, ...]
    start: int
    lo: int
    hi: int
    first_id: int
    keep: np.ndarray

    @property
    def added(self) -> int:
        return int(self.keep.sum())

    @property
    def skipped(self) -> int:
        return len(self.keep) - self.added


def plan_shards(
    stats: TableStats, storage: Storage, shards: int, indexed: pa.Array | None = None
) -> list[Shard]:
    """Cut the ok rows of ``stats.files`` into at most ``shards`` runs of equal length.

    Reads only the ``image_id`` and ``status`` columns (for 10M rows, some 300 MB of strings).

    Args:
        stats: from :func:`~vbatch.operators.index.embeddings.scan_embeddings`.
        storage: the storage layer.
        shards: how many runs at most (runs are never empty).
        indexed: image_ids already in the index (``reid add``); their rows are skipped, and
            faiss ids continue after them.

    Raises:
        ValueError: the table changed since it was scanned (another number of ok rows).
    """
    chunks: list[pa.Array] = []
    file_start: list[int] = []
    total = 0
    for file_uri in stats.files:
        file_start.append(total)
        pf = open_parquet(storage, file_uri)
        for batch in pf.iter_batches(batch_size=65536, columns=["image_id", "status"]):
            ok = pc.fill_null(pc.equal(batch.column("status"), "ok"), False)
            ids = batch.column("image_id").filter(ok).cast(pa.string())
            chunks.append(ids)
            total += len(ids)
    if total != stats.count:
        raise ValueError(
            f"the embeddings table changed while indexing ({stats.count} ok rows, now {total})"
        )
    ids = pa.chunked_array(chunks, pa.string())
    keep = np.zeros(total, dtype=bool)
    if total:
        # the first row of each image_id, as adding in order with a "seen" set would keep
        firsts = (
            pa.table({"image_id": ids, "row": pa.array(np.arange(total, dtype=np.int64))})
            .group_by("image_id", use_threads=False)
            .aggregate([("row", "min")])
            .column("row_min")
        )
        keep[firsts.to_numpy()] = True
    offset = 0
    if indexed is not None:
        keep &= ~pc.is_in(ids, value_set=indexed).to_numpy(zero_copy_only=False)
        offset = len(indexed)
    bounds = np.linspace(0, total, max(1, min(shards, total)) + 1).astype(np.int64)
    kept_before = np.concatenate([[0], np.cumsum(keep)])
    file_end = [*file_start[1:], total]
    out: list[Shard] = []
    for lo, hi in itertools.pairwise(bounds.tolist()):
        if hi == lo:
            continue
        inside = [
            i
            for i, (a, b) in enumerate(zip(file_start, file_end, strict=True))
            if a < hi and b > lo
        ]
        out.append(
            Shard(
                number=len(out),
                files=tuple(stats.files[i] for i in inside),
                start=file_start[inside[0]],
                lo=lo,
                hi=hi,
                first_id=offset + int(kept_before[lo]),
                keep=keep[lo:hi],
            )
        )
    return out


def iter_shard(
    shard: Shard, storage: Storage, dim: int, batch_rows: int
) -> Iterator[tuple[EmbeddingBatch, np.ndarray]]:
    """The shard's rows to index, in order: ``(batch, keep mask over the batch)``."""
    for batch in iter_embeddings(shard.files, storage, dim, batch_rows, start=shard.start):
        o = batch.ordinals
        if o[0] >= shard.hi:
            return
        inside = (o >= shard.lo) & (o < shard.hi)
        if not inside.any():
            continue
        keep = np.zeros(len(o), dtype=bool)
        keep[inside] = shard.keep[o[inside] - shard.lo]
        yield batch, keep


def add_shard(
    index: faiss.Index,
    shard: Shard,
    storage: Storage,
    dim: int,
    batch_rows: int,
    id_part: Path,
    model_version: str | None,
    probe: RecallProbe | None = None,
    refine: NpyPartWriter | None = None,
) -> int:
    """Encode and add the shard's kept rows to ``index``; write their id map rows to
    ``id_part`` and, with ``refine``, their full-precision vectors. Returns the rows added.

    ``index`` may already hold vectors; faiss ids are ``shard.first_id`` onwards either way.
    """
    base = index.ntotal
    with pq.ParquetWriter(id_part, ID_MAP_SCHEMA) as writer:
        for batch, keep in iter_shard(shard, storage, dim, batch_rows):
            if not keep.any():
                continue
            vectors = batch.vectors[keep]
            first = shard.first_id + index.ntotal - base
            faiss_ids = np.arange(first, first + len(vectors), dtype=np.int64)
            index.add(vectors)
            if refine is not None:
                refine.write(vectors)
            if probe is not None:
                probe.observe(vectors, faiss_ids, batch.ordinals[keep])
            writer.write_table(
                pa.table(
                    {
                        "faiss_id": faiss_ids,
                        "image_id": batch.image_ids.filter(pa.array(keep)),
                        "model_version": pa.array([model_version] * len(vectors), pa.string()),
                    },
                    schema=ID_MAP_SCHEMA,
                )
            )
    added = index.ntotal - base
    if added != shard.added:
        raise RuntimeError(f"shard {shard.number}: added {added} vectors, planned {shard.added}")
    return added


def empty_like(index: faiss.Index) -> faiss.Index:
    """``index`` without its vectors (trained state kept): what a shard of ``reid add`` encodes
    with. The inverted lists are replaced, never copied, so a memory-mapped gallery stays mapped."""
    ivf = ivf_or_none(index)
    if ivf is None:
        index.reset()
        return index
    lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    lists.this.disown()  # type: ignore[attr-defined]  # SWIG: the IVF index owns it now
    ivf.replace_invlists(lists, True)
    ivf.ntotal = 0
    index.ntotal = 0
    return index


def list_sizes(index: faiss.Index) -> np.ndarray | None:
    """Entries per inverted list of an IVF index (None for others): what a shard reports, so that
    the merge can size every list once."""
    ivf = ivf_or_none(index)
    if ivf is None:
        return None
    return np.array([ivf.invlists.list_size(i) for i in range(ivf.nlist)], dtype=np.int64)


def reserve_lists(dest: faiss.Index, extra: np.ndarray) -> None:
    """Give each inverted list of ``dest`` room for ``extra[i]`` more entries in one allocation.

    Appending list by list otherwise grows each list's arrays by doubling (codes held at up to
    twice their size, plus the copy at each step); reserved, the merge holds the codes once.
    """
    ivf = ivf_or_none(dest)
    if ivf is None:
        return
    if len(extra) != ivf.nlist:
        raise ValueError(f"{len(extra)} list sizes for an index of {ivf.nlist} lists")
    lists = ivf.invlists
    for list_no in np.flatnonzero(extra):
        n = lists.list_size(int(list_no))
        # growing the (std::vector) arrays to the final size allocates exactly that size from
        # empty; shrinking back keeps the allocation, which add_entries then fills
        lists.resize(int(list_no), n + int(extra[list_no]))
        lists.resize(int(list_no), n)


def append_index(dest: faiss.Index, shard_file: Path) -> None:
    """Append the vectors of a shard's index file (encoded by the same trained index) to
    ``dest``, their ids shifted by ``dest.ntotal``: the result equals adding them to ``dest``.

    An IVF shard is memory-mapped and its lists copied list by list (faiss' own ``merge_from``
    empties its source, which a mapped file cannot be); other indexes are small by the planner's
    choice and merged with ``merge_from``.
    """
    ivf = ivf_or_none(dest)
    if ivf is None:
        src = faiss.read_index(str(shard_file))
        if isinstance(faiss.downcast_index(dest), faiss.IndexHNSW):
            # faiss cannot merge HNSW graphs: the shard's vectors, read back from its storage,
            # are added instead (what adding them to ``dest`` would have done)
            dest.add(src.reconstruct_n(0, src.ntotal))
        else:
            dest.merge_from(src, 0)
        return
    src = faiss.read_index(str(shard_file), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
    src_ivf = ivf_or_none(src)
    if src_ivf is None or src_ivf.nlist != ivf.nlist or src_ivf.code_size != ivf.code_size:
        raise ValueError(f"{shard_file}: not a shard of this index")
    shift = dest.ntotal
    lists, src_lists, code_size = ivf.invlists, src_ivf.invlists, src_ivf.code_size
    for list_no in range(src_ivf.nlist):
        n = src_lists.list_size(list_no)
        if n == 0:
            continue
        ids = faiss.rev_swig_ptr(src_lists.get_ids(list_no), n) + shift
        codes = faiss.rev_swig_ptr(src_lists.get_codes(list_no), n * code_size)
        lists.add_entries(list_no, n, faiss.swig_ptr(ids), faiss.swig_ptr(codes))
    ivf.ntotal += src.ntotal
    if isinstance(faiss.downcast_index(dest), faiss.IndexPreTransform):
        dest.ntotal += src.ntotal
