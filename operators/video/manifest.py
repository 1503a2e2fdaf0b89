"""Reading a video manifest on the driver: one small row per video, validated, queries checked."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from vbatch.operators.manifest import ERROR, ROW, manifest_files, read_manifest_schema
from vbatch.operators.storage import Storage, normalize, parent
from vbatch.operators.video.columns import KEY_COLUMNS, QUERY_ERRORS
from vbatch.operators.video.queries import QueryCheck, all_query_errors
from vbatch.schemas.videos import ManifestError, check_video_manifest_schema, video_row_errors


@dataclass(frozen=True)
class VideoManifestInfo:
    uri: str
    files: tuple[str, ...]
    base_uri: str
    num_rows: int
    num_bad_rows: int
    #: queries over all rows (bad rows included)
    num_queries: int
    #: a manifest file has ``gt_mask_dir``: the results get J and F per frame
    has_gt: bool = False


def read_video_manifest(
    uri: str,
    storage: Storage,
    limit: int | None = None,
    videos_per_block: int = 1,
    query_check: QueryCheck | None = None,
) -> tuple[ray.data.Dataset, VideoManifestInfo]:
    """Read and validate a video manifest on the driver (one small row per video).

    Args:
        uri: one Parquet file or a folder of them (local path, file:// or s3://).
        storage: the job's storage.
        limit: keep only the first ``limit`` rows in manifest order.
        videos_per_block: rows per dataset block; 1 lets every video's probe run in parallel.
        query_check: the model's check of each query (e.g. its token limit,
            :func:`vbatch.operators.video.queries.rvos_query_check`); a query it refuses becomes an
            error of its own, and a video none of whose queries can run an error as a whole.

    Returns:
        A dataset with ``video_id, uri, queries, start_s, end_s, _vb_row, _vb_error,
        _vb_query_errors`` and facts.

    Raises:
        ManifestError: no such manifest, a file that is not Parquet, a missing/mistyped column.
    """
    files = manifest_files(uri, storage)
    tables = []
    has_gt = False
    for f in files:
        schema = read_manifest_schema(f, storage)
        check_video_manifest_schema(schema, f)
        fs, path = storage.arrow_fs(f)
        columns = [c for c in KEY_COLUMNS if c in schema.names]
        has_gt = has_gt or "gt_mask_dir" in schema.names
        table = pq.read_table(path, filesystem=fs, columns=columns)
        tables.append(
            pa.table(
                {
                    "video_id": table.column("video_id").cast(pa.string()),
                    "uri": table.column("uri").cast(pa.string()),
                    "queries": table.column("queries").cast(pa.list_(pa.string())),
                    **{
                        c: table.column(c).cast(pa.float64())
                        if c in table.column_names
                        else pa.nulls(table.num_rows, pa.float64())
                        for c in ("start_s", "end_s")
                    },
                    "gt_mask_dir": table.column("gt_mask_dir").cast(pa.string())
                    if "gt_mask_dir" in table.column_names
                    else pa.nulls(table.num_rows, pa.string()),
                }
            )
        )
    table = pa.concat_tables(tables)
    if limit is not None:
        table = table.slice(0, limit)
    if table.num_rows == 0:
        raise ManifestError(f"manifest {uri}: no rows")
    queries = table.column("queries").to_pylist()
    errors = video_row_errors(
        table.column("video_id").to_pylist(),
        table.column("uri").to_pylist(),
        queries,
        table.column("start_s").to_pylist(),
        table.column("end_s").to_pylist(),
    )
    q_errors = all_query_errors(queries, query_check)
    for row, (err, qs, qerrs) in enumerate(zip(errors, queries, q_errors, strict=True)):
        if err is None and qs and all(e is not None for e in qerrs):  # the model refused them all
            problems = "; ".join(f"query {i}: {e}" for i, e in enumerate(qerrs))
            errors[row] = f"manifest row {row}: no query can run ({problems})"
    table = table.append_column(ROW, pa.array(range(table.num_rows), pa.int64()))
    table = table.append_column(ERROR, pa.array(errors, pa.string()))
    table = table.append_column(QUERY_ERRORS, pa.array(q_errors, pa.list_(pa.string())))
    blocks = [table.slice(i, videos_per_block) for i in range(0, table.num_rows, videos_per_block)]
    single = len(files) == 1 and files[0] == normalize(uri)
    info = VideoManifestInfo(
        uri=files[0] if single else normalize(uri),
        files=tuple(files),
        base_uri=parent(files[0]) if single else normalize(uri),
        num_rows=table.num_rows,
        num_bad_rows=sum(e is not None for e in errors),
        num_queries=sum(len(q or []) for q in queries),
        has_gt=has_gt,
    )
    return ray.data.from_arrow(blocks), info
