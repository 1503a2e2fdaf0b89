"""Schemas of video manifests and per-frame results, as data, with their validation.

A video manifest is one Parquet file or a folder of them (read in sorted path order, the "manifest
order"). Required columns:

- ``video_id`` (string, unique, non-null): names the outputs;
- ``uri`` (string): the video file; relative URIs resolve against the manifest's folder;
- ``queries`` (``list<string>``): one or more text queries ("a person riding a bike").

Optional: ``start_s`` / ``end_s`` (float or integer seconds): only frames whose timestamp lies in
``[start_s, end_s)`` are segmented. ``gt_mask_dir`` (string): the video's ground-truth masks,
``<gt_mask_dir>/<query_index>/<frame_index>.png``; the results then get per-frame ``gt_j``/``gt_f``
(:mod:`vbatch.operators.quality`). Other columns are ignored.

A missing or mistyped required column fails the job before any work starts, naming the file and the
column. A bad *row* never stops the job: null/empty/duplicate id, empty uri, no queries,
``start_s >= end_s`` make the whole video an error (one error row per query, or one row with a null
``query_index`` when the video has no queries); an empty query makes only that query an error (the
video's other queries still run). For a duplicate id, the first occurrence in manifest order runs.
The uri is checked here only as a non-empty string: a scheme the job cannot read, a missing or
unreadable file, or a query the model cannot take becomes that video's (or query's) error rows in
the job.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyarrow as pa

from vbatch.schemas.images import (
    INTERNAL_PREFIX,
    STATUS_ERROR,
    STATUS_OK,
    ManifestError,
    image_row_errors,
    is_string,
    require_columns,
)

__all__ = [
    "INTERNAL_PREFIX",
    "VIDEO_GT_FIELDS",
    "VIDEO_MANIFEST",
    "VIDEO_RESULTS",
    "ManifestError",
    "check_video_manifest_schema",
    "query_errors",
    "validate_video_results",
    "video_results_schema",
    "video_row_errors",
]

VIDEO_MANIFEST = pa.schema(
    [
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("queries", pa.list_(pa.string()), nullable=False),
    ]
)
#: optional columns: the segment of the video to process, in seconds
OPTIONAL_TIME_COLUMNS = ("start_s", "end_s")

#: one row per (video, query, frame); error rows have a null frame_index (whole video or query
#: failed) or a frame_index with a null mask_uri (that frame's window failed)
VIDEO_RESULTS = pa.schema(
    [
        pa.field("video_id", pa.string()),
        pa.field("uri", pa.string()),  # the video, resolved against the manifest's folder
        pa.field("query_index", pa.int32()),  # position in the manifest's query list
        pa.field("query", pa.string()),
        pa.field("frame_index", pa.int64()),  # index of the frame in the video file (0-based)
        pa.field("timestamp_s", pa.float64()),  # presentation time of that frame
        pa.field("mask_uri", pa.string()),  # 8-bit PNG, 0/255, the frame's original size
        pa.field("status", pa.string()),  # "ok" | "error"
        pa.field("error", pa.string()),  # null when ok
        pa.field("model_version", pa.string()),  # short sha256 of the checkpoint file
        pa.field("manifest_row", pa.int64()),  # the video's row in manifest order (accounting)
    ]
)

#: the columns a video job with ``gt_mask_dir`` adds to :data:`VIDEO_RESULTS`: region J and
#: boundary F of the frame (null where the frame has no ground truth), and why the ground truth of
#: a video's query could not be used
VIDEO_GT_FIELDS = (
    pa.field("gt_j", pa.float64()),
    pa.field("gt_f", pa.float64()),
    pa.field("gt_error", pa.string()),
)


def video_results_schema(gt: bool) -> pa.Schema:
    """:data:`VIDEO_RESULTS`, with :data:`VIDEO_GT_FIELDS` when the manifest has ground truth."""
    return pa.schema([*VIDEO_RESULTS, *VIDEO_GT_FIELDS]) if gt else VIDEO_RESULTS


def check_video_manifest_schema(schema: pa.Schema, source: str) -> None:
    """Fail fast on a video manifest that cannot be used.

    Args:
        schema: the Parquet schema of one manifest file.
        source: the file, for the message.

    Raises:
        ManifestError: a required column is missing or mistyped (names the file and the column).
    """
    names = set(schema.names)
    require_columns(schema, source, VIDEO_MANIFEST.names, strings=("video_id", "uri"))
    typ = schema.field("queries").type
    if not ((pa.types.is_list(typ) or pa.types.is_large_list(typ)) and is_string(typ.value_type)):
        raise ManifestError(
            f"manifest {source}: column 'queries' must be list<string>, found {typ}"
        )
    for name in OPTIONAL_TIME_COLUMNS:
        if name in names:
            typ = schema.field(name).type
            if not (pa.types.is_floating(typ) or pa.types.is_integer(typ)):
                raise ManifestError(
                    f"manifest {source}: column {name!r} must be a number of seconds, found {typ}"
                )
    if "gt_mask_dir" in names and not is_string(schema.field("gt_mask_dir").type):
        raise ManifestError(
            f"manifest {source}: column 'gt_mask_dir' must be a string (a folder), found "
            f"{schema.field('gt_mask_dir').type}"
        )
    internal = sorted(n for n in names if n.startswith(INTERNAL_PREFIX))
    if internal:
        raise ManifestError(
            f"manifest {source}: column(s) {', '.join(internal)} use the reserved prefix "
            f"{INTERNAL_PREFIX!r}; rename them"
        )


def query_errors(queries: Sequence[str | None] | None) -> list[str | None]:
    """Per-query problems of one video: ``None`` for a query that can run."""
    return [
        "query is null" if q is None else ("query is empty" if not q.strip() else None)
        for q in (queries or [])
    ]


def video_row_errors(
    video_ids: Sequence[str | None],
    uris: Sequence[str | None],
    queries: Sequence[Sequence[str | None] | None],
    starts: Sequence[float | None] | None = None,
    ends: Sequence[float | None] | None = None,
) -> list[str | None]:
    """Per-row problems of a video manifest, in manifest order; ``None`` for a good row.

    Args:
        video_ids, uris, queries: the required columns of the whole manifest, in manifest order.
        starts, ends: the optional ``start_s`` / ``end_s`` columns (``None`` when absent).

    Returns:
        One message or ``None`` per row. For a duplicate id the first occurrence is good and every
        later one is an error naming the first row. A row whose queries are all empty is an error.
    """
    n = len(video_ids)
    starts = starts if starts is not None else [None] * n
    ends = ends if ends is not None else [None] * n
    errors = image_row_errors(video_ids, uris, id_name="video_id")  # the id and uri rules
    for row, (qs, start, end) in enumerate(zip(queries, starts, ends, strict=True)):
        if errors[row] is not None:
            continue
        problem = None
        if not qs:
            problem = "queries is empty (at least one text query is needed)"
        elif all(e is not None for e in query_errors(qs)):
            problem = "every query is empty"
        elif any(t is not None and not math.isfinite(t) for t in (start, end)):
            problem = f"start_s/end_s must be finite (got {start}, {end})"
        elif start is not None and start < 0:
            problem = f"start_s must be >= 0, got {start}"
        elif start is not None and end is not None and start >= end:
            problem = f"start_s ({start}) must be before end_s ({end})"
        if problem is not None:
            errors[row] = f"manifest row {row}: {problem}"
    return errors


def validate_video_results(table: pa.Table) -> None:
    """Check a results table: the columns and types of :data:`VIDEO_RESULTS`, statuses and errors.

    Raises ``ValueError`` naming the column or the row.
    """
    for field in VIDEO_RESULTS:
        if field.name not in table.column_names:
            raise ValueError(f"results: missing column {field.name!r}")
        if not table.schema.field(field.name).type.equals(field.type):
            raise ValueError(
                f"results: column {field.name!r} is {table.schema.field(field.name).type}, "
                f"expected {field.type}"
            )
    cols = table.select(["status", "error", "mask_uri", "frame_index"]).to_pylist()
    for row, r in enumerate(cols):
        if r["status"] not in (STATUS_OK, STATUS_ERROR):
            raise ValueError(
                f"results row {row}: status {r['status']!r} is neither 'ok' nor 'error'"
            )
        if (r["status"] == STATUS_ERROR) != (r["error"] is not None):
            raise ValueError(f"results row {row}: status {r['status']!r} with error {r['error']!r}")
        if r["status"] == STATUS_OK and (r["mask_uri"] is None or r["frame_index"] is None):
            raise ValueError(f"results row {row}: ok without a mask_uri and a frame_index")
