"""Read a Parquet manifest with Ray Data and tag every row with its manifest order and problems.

The manifest is read by Ray Data through the job's filesystem (S3 or local). Duplicate ids need a
global view, so the driver gathers only the two key columns (``image_id``, ``uri``), computes the
per-row errors (``schemas.images.image_row_errors``) and hands them back to small tasks that attach
them to the blocks, which stay in the object store. The blocks are re-cut into slices of
``rows_per_block`` so that a manifest written as one big file still spreads over every worker.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from operators.storage import Storage, normalize, parent
from schemas.images import (
    INTERNAL_PREFIX,
    ManifestError,
    check_image_manifest_schema,
    image_row_errors,
)

logger = logging.getLogger(__name__)

ROW = f"{INTERNAL_PREFIX}row"  # int64: position in manifest order
ERROR = f"{INTERNAL_PREFIX}error"  # string: the row's first problem, null while it is fine


@dataclass(frozen=True)
class ManifestInfo:
    uri: str
    files: tuple[str, ...]
    #: folder that relative ``uri`` values resolve against
    base_uri: str
    num_rows: int
    num_bad_rows: int
    passthrough: pa.Schema


def manifest_files(uri: str, storage: Storage) -> list[str]:
    """The Parquet files of a manifest (one file, or a folder read in sorted order)."""
    try:
        files = storage.list_files(uri, suffix=".parquet")
    except (FileNotFoundError, PermissionError, OSError) as e:
        raise ManifestError(f"manifest {uri}: cannot list it: {e}") from e
    if not files:
        raise ManifestError(f"manifest {uri}: not found, or a folder with no .parquet files")
    return files


@ray.remote
def _key_columns(block: pa.Table) -> pa.Table:
    return block.select(["image_id", "uri"])


@ray.remote
def _annotate(
    block: pa.Table, start: int, stop: int, first_row: int, errors: list[str | None]
) -> pa.Table:
    part = block.slice(start, stop - start)
    part = part.append_column(
        ROW, pa.array(range(first_row, first_row + part.num_rows), pa.int64())
    )
    return part.append_column(ERROR, pa.array(errors, pa.string()))


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
        rows_per_block: rows per dataset block; the unit of parallelism of the CPU stages.

    Returns:
        A dataset with the manifest's columns plus ``_vb_row`` and ``_vb_error``, and facts about it.

    Raises:
        ManifestError: no such manifest, or a missing/mistyped required column (names file and column).
    """
    files = manifest_files(uri, storage)
    fs, _ = storage.arrow_fs(files[0])
    passthrough = None
    for f in files:  # every file must have the required columns; the message names the file
        _, path = storage.arrow_fs(f)
        try:
            schema = pq.read_schema(path, filesystem=fs)
        except Exception as e:
            raise ManifestError(f"manifest {f}: not a readable Parquet file: {e}") from e
        this = check_image_manifest_schema(schema, f, output)
        passthrough = passthrough or this

    paths = [storage.arrow_fs(f)[1] for f in files]
    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # block order = manifest order
    try:
        blocks = ray.data.read_parquet(paths, filesystem=fs, file_extensions=None).to_arrow_refs()
    finally:
        ctx.execution_options.preserve_order = saved

    keys = ray.get([_key_columns.remote(b) for b in blocks])
    sizes = [k.num_rows for k in keys]
    all_keys = pa.concat_tables(keys) if keys else pa.table({"image_id": [], "uri": []})
    total = all_keys.num_rows if limit is None else min(limit, all_keys.num_rows)
    errors = image_row_errors(
        all_keys.column("image_id").to_pylist()[:total], all_keys.column("uri").to_pylist()[:total]
    )

    refs = []
    offset = 0
    for block, size in zip(blocks, sizes, strict=True):
        for start in range(0, size, rows_per_block):
            stop = min(size, start + rows_per_block)
            first = offset + start
            if first >= total:
                break
            stop = min(stop, start + total - first)
            refs.append(
                _annotate.remote(block, start, stop, first, errors[first : first + stop - start])
            )
        offset += size
    info = ManifestInfo(
        uri=normalize(uri) if len(files) > 1 or files[0] != normalize(uri) else files[0],
        files=tuple(files),
        base_uri=parent(files[0])
        if len(files) == 1 and files[0] == normalize(uri)
        else normalize(uri),
        num_rows=total,
        num_bad_rows=sum(e is not None for e in errors),
        passthrough=passthrough if passthrough is not None else pa.schema([]),
    )
    if not refs:
        raise ManifestError(f"manifest {uri}: no rows")
    return ray.data.from_arrow_refs(refs), info  # type: ignore[arg-type]  # Ray's two ObjectRef stubs
