"""Read a Parquet manifest with Ray Data and tag every row with its manifest order and problems.

The manifest is read by Ray Data through the job's filesystem (S3 or local). Duplicate ids need a
global view, but the ids never travel: a task per block returns a problem code and a 64-bit hash
per row (9 bytes), the driver finds the hashes that repeat and fetches the exact ids of those rows
only, then one task per block attaches the row numbers and errors and re-cuts the block into
slices of ``rows_per_block`` rows, so that a manifest written as one big file still spreads over
every worker. A large manifest gets larger slices (about ``MAX_BLOCKS`` of them): every slice is
a Ray object and a task downstream, and their overhead dominated on the driver. A million rows at
the segment job's 32 rows per block (``bench/bench_manifest.py``, 2 cores): 31,250 slices, 60 s
and +755 MB of driver memory when the driver gathered the ids and cut every slice in its own task;
2045 slices of 489 rows, 11 s and +40 MB now (15 s through Ray 2.60's default reader, which starts
32 actors to list the files: :func:`read_parquet_files`). The CPU stages work through a slice
``rows_per_block`` rows at a time (``map_batches(batch_size=…)``), so memory per task stays bounded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from vbatch.operators.storage import Storage, normalize, parent
from vbatch.schemas.images import (
    ID_EMPTY,
    ID_NULL,
    INTERNAL_PREFIX,
    KEY_OK,
    ManifestError,
    check_image_manifest_schema,
    key_error,
    key_problems,
)

logger = logging.getLogger(__name__)

ROW = f"{INTERNAL_PREFIX}row"  # int64: position in manifest order
ERROR = f"{INTERNAL_PREFIX}error"  # string: the row's first problem, null while it is fine
#: most dataset blocks a manifest is cut into (their size grows beyond ``rows_per_block`` instead)
MAX_BLOCKS = 2048


@dataclass(frozen=True)
class ManifestInfo:
    uri: str
    files: tuple[str, ...]
    #: folder that relative ``uri`` values resolve against
    base_uri: str
    num_rows: int
    num_bad_rows: int
    passthrough: pa.Schema


def read_parquet_files(paths: list[str], fs: Any, **kwargs: Any) -> ray.data.Dataset:
    """``ray.data.read_parquet`` of a known list of files, through Ray Data's file-per-task reader.

    Ray 2.60's default (``DataContext.use_datasource_v2``) lists the files through a pool of 32
    footer-reading actors that it starts for every read and kills after: on a 2-CPU node a one-file
    manifest took 5-10 s to read that way, and 0.1 s (3 s cold) through the older reader, which
    reads each file in a task. A job reads files it has already listed, so it has nothing to gain
    from the actors; the switch holds for building this read's plan only. One block per file, as
    the default reader gave: the older one splits a file's rows into more blocks to fill the
    cluster, but the manifest's own cut (:func:`read_image_manifest`) decides the job's blocks.
    """
    ctx = ray.data.DataContext.get_current()
    saved = ctx.use_datasource_v2
    ctx.use_datasource_v2 = False
    try:
        return ray.data.read_parquet(paths, filesystem=fs, override_num_blocks=len(paths), **kwargs)
    finally:
        ctx.use_datasource_v2 = saved


def manifest_files(uri: str, storage: Storage) -> list[str]:
    """The Parquet files of a manifest (one file, or a folder read in sorted order)."""
    try:
        files = storage.list_files(uri, suffix=".parquet")
    except (FileNotFoundError, PermissionError, OSError) as e:
        raise ManifestError(f"manifest {uri}: cannot list it: {e}") from e
    if not files:
        raise ManifestError(f"manifest {uri}: not found, or a folder with no .parquet files")
    return files


def read_manifest_schema(file_uri: str, storage: Storage) -> pa.Schema:
    """The Arrow schema of one manifest file (``ManifestError`` if it is not readable Parquet)."""
    fs, path = storage.arrow_fs(file_uri)
    try:
        return pq.read_schema(path, filesystem=fs)
    except Exception as e:
        raise ManifestError(f"manifest {file_uri}: not a readable Parquet file: {e}") from e


# -- duplicate ids: a 64-bit hash per row travels, the exact ids of repeated hashes only -------


def id_hashes(image_ids: pa.Array) -> np.ndarray:
    """A ``uint64`` hash per id (pandas' SipHash with its fixed key: the same on every worker)."""
    values = pa.array(image_ids, pa.string()).fill_null("").to_numpy(zero_copy_only=False)
    return pd.util.hash_array(values, categorize=False)


def sorted_lookup(values: np.ndarray, sorted_set: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each of ``values``: whether it is in ``sorted_set`` (ascending) and where (an index
    into ``sorted_set``; meaningless where absent)."""
    if not len(sorted_set):
        return np.zeros(len(values), dtype=bool), np.zeros(len(values), dtype=np.int64)
    at = np.clip(np.searchsorted(sorted_set, values), 0, len(sorted_set) - 1)
    return sorted_set[at] == values, at


def duplicate_candidates(hashes: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Rows (ascending) with a usable id whose hash another such row shares: every duplicate id is
    among them, plus any hash collisions, which :func:`first_occurrences` tells apart."""
    usable = np.flatnonzero((codes != ID_NULL) & (codes != ID_EMPTY))
    h = hashes[usable]
    order = np.argsort(h, kind="stable")
    hs = h[order]
    repeated = np.zeros(len(hs), dtype=bool)
    same = hs[1:] == hs[:-1]
    repeated[1:] |= same
    repeated[:-1] |= same
    return np.sort(usable[order[repeated]])


def first_occurrences(rows: np.ndarray, image_ids: Sequence[str]) -> dict[int, int]:
    """``{row: first row with the same id}`` for every later occurrence among ``rows``
    (ascending, with their ids)."""
    first: dict[str, int] = {}
    later: dict[int, int] = {}
    for row, image_id in zip(rows.tolist(), image_ids, strict=True):
        if image_id in first:
            later[row] = first[image_id]
        else:
            first[image_id] = row
    return later


@ray.remote
def _block_keys(block: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(problem code, id hash) per row of a block."""
    if block.num_rows == 0:  # an empty file's block may not even carry the columns
        return np.empty(0, np.uint8), np.empty(0, np.uint64)
    ids = block.column("image_id").combine_chunks()
    return key_problems(ids, block.column("uri").combine_chunks()), id_hashes(ids)


@ray.remote
def _ids_at(block: pa.Table, rows: np.ndarray) -> list[str]:
    return block.column("image_id").take(pa.array(rows, pa.int64())).to_pylist()


def _slice_starts(rows: int, rows_per_block: int) -> range:
    return range(0, rows, rows_per_block)


@ray.remote
def _annotate(
    block: pa.Table,
    first_row: int,
    rows_per_block: int,
    codes: np.ndarray,
    later: dict[int, int],
) -> pa.Table | tuple[pa.Table, ...]:
    """The first ``len(codes)`` rows of a block with their manifest row and error, in slices of
    ``rows_per_block`` (one return value each). ``codes``: the rows' problem codes; ``later``:
    block row -> first manifest row of its id, for the duplicates."""
    rows = len(codes)
    block = block.slice(0, rows)
    ids = block.column("image_id")
    errors = [
        None
        if code == KEY_OK and i not in later
        else key_error(first_row + i, int(code), ids[i].as_py(), later.get(i))
        for i, code in enumerate(codes)
    ]
    block = block.append_column(ROW, pa.array(range(first_row, first_row + rows), pa.int64()))
    block = block.append_column(ERROR, pa.array(errors, pa.string()))
    parts = tuple(block.slice(s, rows_per_block) for s in _slice_starts(rows, rows_per_block))
    return parts[0] if len(parts) == 1 else parts


def read_image_manifest(
    uri: str,
    storage: Storage,
    output: str,
    limit: int | None = None,
    rows_per_block: int = 64,
) -> tuple[ray.data.Dataset, ManifestInfo]:
    """Read and validate an image manifest.

    Args:
        uri: one Parquet file or a folder of them (local path, file:// or s3://).
        storage: the job's storage.
        output: the model's output kind (its result column names may not appear in the manifest).
        limit: keep only the first ``limit`` rows in manifest order.
        rows_per_block: rows per dataset block, the unit of parallelism of the CPU stages (more for
            a manifest of over ``MAX_BLOCKS * rows_per_block`` rows: see the module docstring).

    Returns:
        A dataset with the manifest's columns plus ``_vb_row`` and ``_vb_error``, and facts about it.

    Raises:
        ManifestError: no such manifest, or a missing/mistyped required column (names file and column).
    """
    files = manifest_files(uri, storage)
    fs, _ = storage.arrow_fs(files[0])
    passthrough = None
    for f in files:  # every file must have the required columns; the message names the file
        this = check_image_manifest_schema(read_manifest_schema(f, storage), f, output)
        passthrough = passthrough or this

    paths = [storage.arrow_fs(f)[1] for f in files]
    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # block order = manifest order
    try:
        blocks = read_parquet_files(paths, fs, file_extensions=None).to_arrow_refs()
    finally:
        ctx.execution_options.preserve_order = saved

    keys = ray.get([_block_keys.remote(b) for b in blocks])
    sizes = [len(codes) for codes, _ in keys]
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    total = int(starts[-1]) if limit is None else min(limit, int(starts[-1]))
    codes = np.concatenate([c for c, _ in keys] or [np.empty(0, np.uint8)])[:total]
    hashes = np.concatenate([h for _, h in keys] or [np.empty(0, np.uint64)])[:total]
    del keys
    # exact ids of the rows whose hashes repeat, fetched from their blocks
    candidates = duplicate_candidates(hashes, codes)
    owner = np.searchsorted(starts, candidates, side="right") - 1  # ascending, as candidates
    owners, first_of = np.unique(owner, return_index=True)
    groups = np.split(candidates, first_of[1:]) if len(candidates) else []
    fetch = dict(zip(owners.tolist(), groups, strict=True))
    fetched = ray.get([_ids_at.remote(blocks[b], rows - starts[b]) for b, rows in fetch.items()])
    later = first_occurrences(
        np.concatenate(list(fetch.values()) or [np.empty(0, np.int64)]),
        [image_id for ids in fetched for image_id in ids],
    )

    per_block: dict[int, dict[int, int]] = {}
    for (row, first_row), b in zip(
        later.items(), np.searchsorted(starts, list(later), side="right") - 1, strict=True
    ):
        per_block.setdefault(int(b), {})[row - int(starts[b])] = first_row

    rows_per_block = max(rows_per_block, -(-total // MAX_BLOCKS))
    refs: list[Any] = []
    for b, block in enumerate(blocks):
        first, rows = int(starts[b]), min(sizes[b], total - int(starts[b]))
        if first >= total:
            break
        if rows == 0:  # an empty file or row group
            continue
        n_parts = len(_slice_starts(rows, rows_per_block))
        out: Any = _annotate.options(num_returns=n_parts).remote(
            block, first, rows_per_block, codes[first : first + rows], per_block.get(b, {})
        )
        refs.extend(out if n_parts > 1 else [out])
    info = ManifestInfo(
        uri=normalize(uri) if len(files) > 1 or files[0] != normalize(uri) else files[0],
        files=tuple(files),
        base_uri=parent(files[0])
        if len(files) == 1 and files[0] == normalize(uri)
        else normalize(uri),
        num_rows=total,
        num_bad_rows=int(np.count_nonzero(codes)) + sum(codes[r] == KEY_OK for r in later),
        passthrough=passthrough if passthrough is not None else pa.schema([]),
    )
    if not refs:
        # nothing new tonight is a valid input: an empty dataset with the manifest's columns, so
        # that the job publishes an empty results table and succeeds
        first_schema = read_manifest_schema(files[0], storage)
        empty = first_schema.empty_table()
        empty = empty.append_column(ROW, pa.array([], pa.int64()))
        empty = empty.append_column(ERROR, pa.array([], pa.string()))
        logger.warning("manifest %s has no rows", uri)
        return ray.data.from_arrow(empty), info
    return ray.data.from_arrow_refs(refs), info  # type: ignore[arg-type]  # Ray's two ObjectRef stubs
