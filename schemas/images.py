"""Schemas of image manifests and per-image results, as data, with their validation.

A manifest is one Parquet file or a folder of them (read in sorted path order: that order is the
"manifest order" used for duplicate ids). Required columns: ``image_id`` (string, unique, non-null)
and ``uri`` (string; relative URIs resolve against the manifest's folder). Any other column passes
through untouched into the results.

A missing or mistyped required column fails the job before any work starts; a bad *row* (null or
empty id, duplicate id, empty uri) never stops the job: it becomes a result row with
``status="error"``. For a duplicate id, the first occurrence in manifest order is processed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vbatch.schemas.errors import ERROR_CLASSES

IMAGE_MANIFEST = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
    ]
)

#: columns every per-image results table starts with, whatever the task
COMMON_RESULT_FIELDS: list[pa.Field] = [
    pa.field("image_id", pa.string()),
    pa.field("uri", pa.string()),
    pa.field("task", pa.string()),
    pa.field("status", pa.string()),  # "ok" | "error"
    pa.field("error", pa.string()),  # null when ok
    # null when ok; else one of vbatch.schemas.errors.ERROR_CLASSES ("infrastructure": a rerun may fix it)
    pa.field("error_class", pa.string()),
    pa.field("width", pa.int32()),  # of the original image; null when it could not be decoded
    pa.field("height", pa.int32()),
    pa.field("model_version", pa.string()),  # short sha256 of the checkpoint file
    pa.field("processed_at", pa.timestamp("us", tz="UTC")),
    # the input's content fingerprint when known (the manifest's content_hash/etag column, or the
    # object's listing entry under --reuse): what the next run's --reuse compares
    pa.field("source_fingerprint", pa.string()),
]

#: what each kind of model output adds to the common columns
OUTPUT_FIELDS: dict[str, list[pa.Field]] = {
    # foreground_ratio: the mask's mean / 255 (salient: mean saliency; shop-seg: share of product
    # pixels), what the report ranks and plots without opening a million PNGs
    "mask": [pa.field("mask_uri", pa.string()), pa.field("foreground_ratio", pa.float32())],
    "rgba": [
        pa.field("matte_uri", pa.string()),
        pa.field("cutout_uri", pa.string()),
        pa.field("composite_uri", pa.string()),
        pa.field("foreground_ratio", pa.float32()),
    ],
}

#: the result columns that hold product URIs (images and video frames): the folders they name are
#: the committed generation's products (``jobs.publish``)
PRODUCT_URI_COLUMNS = ("mask_uri", "matte_uri", "cutout_uri", "composite_uri")

#: the per-image metrics of each metric kind (a model's ``ModelEntry.metric_kind``), added when the
#: manifest has a ground-truth column (``gt_mask_uri``, see :mod:`vbatch.operators.quality`), all
#: null on rows without a usable ground truth, and ``gt_error``: why a row that names a ground
#: truth has no metrics (null otherwise). The row's status stays ``ok``: an unreadable ground
#: truth never costs a prediction. (Video masks are scored per frame: ``schemas.videos``.)
METRIC_FIELDS: dict[str, list[pa.Field]] = {
    "saliency": [
        pa.field("gt_mae", pa.float32()),
        pa.field("gt_max_fmeasure", pa.float32()),
        pa.field("gt_smeasure", pa.float32()),
        pa.field("gt_mean_emeasure", pa.float32()),
    ],
    "mask": [pa.field("gt_iou", pa.float32()), pa.field("gt_boundary_f", pa.float32())],
    "matte": [pa.field("gt_sad", pa.float32()), pa.field("gt_mse", pa.float32())],
}
GT_ERROR_FIELD = pa.field("gt_error", pa.string())


def metric_fields(kind: str | None) -> list[pa.Field]:
    """The metric columns of metric kind ``kind`` plus ``gt_error`` (empty for ``None`` or a kind
    without per-image metrics)."""
    fields = METRIC_FIELDS.get(kind, []) if kind else []
    return [*fields, GT_ERROR_FIELD] if fields else []


STATUS_OK = "ok"
STATUS_ERROR = "error"

#: internal columns carried between pipeline stages; never written out
INTERNAL_PREFIX = "_vb_"


class ManifestError(ValueError):
    """The manifest as a whole cannot be used (missing file, missing/mistyped column)."""


def embedding_field(dim: int) -> pa.Field:
    """L2-normalised float32 vectors; null on error rows."""
    return pa.field("embedding", pa.list_(pa.float32(), dim))


def image_results_schema(
    output: str, passthrough: pa.Schema | None = None, embedding_dim: int | None = None
) -> pa.Schema:
    """The results schema for a model output kind, plus passthrough columns.

    Args:
        output: ``"mask"``, ``"rgba"`` or ``"embedding"`` (which needs ``embedding_dim``).
    """
    fields = COMMON_RESULT_FIELDS + OUTPUT_FIELDS.get(output, [])
    if output == "embedding":
        if embedding_dim is None:
            raise ValueError("the embedding results schema needs embedding_dim")
        fields = [*fields, embedding_field(embedding_dim)]
    if passthrough is not None:
        fields = fields + [f for f in passthrough if f.name not in {g.name for g in fields}]
    return pa.schema(fields)


def reserved_names(output: str) -> set[str]:
    extra = {"embedding"} if output == "embedding" else set()
    return {f.name for f in COMMON_RESULT_FIELDS + OUTPUT_FIELDS.get(output, [])} | extra


def is_string(typ: pa.DataType) -> bool:
    return pa.types.is_string(typ) or pa.types.is_large_string(typ)


def require_columns(
    schema: pa.Schema, source: str, names: Sequence[str], strings: Sequence[str] = ()
) -> None:
    """``ManifestError`` (naming the file and the column) unless every one of ``names`` is present
    and every one of ``strings`` is a string column."""
    for name in names:
        if name not in schema.names:
            raise ManifestError(
                f"manifest {source}: missing required column {name!r} "
                f"(found: {', '.join(schema.names) or 'no columns'})"
            )
    for name in strings:
        typ = schema.field(name).type
        if not is_string(typ):
            raise ManifestError(f"manifest {source}: column {name!r} must be string, found {typ}")


def check_image_manifest_schema(schema: pa.Schema, source: str, output: str) -> pa.Schema:
    """Fail fast on a manifest that cannot be used; return the passthrough columns' schema.

    Args:
        schema: the Parquet schema of the manifest file.
        source: the file, for the message.
        output: the model's output kind, whose result columns a manifest may not reuse.
    """
    names = set(schema.names)
    require_columns(schema, source, IMAGE_MANIFEST.names, strings=IMAGE_MANIFEST.names)
    clash = sorted((names - {"image_id", "uri"}) & reserved_names(output))
    internal = sorted(n for n in names if n.startswith(INTERNAL_PREFIX))
    if clash or internal:
        raise ManifestError(
            f"manifest {source}: column(s) {', '.join(clash + internal)} collide with result columns; "
            "rename them"
        )
    return pa.schema([f for f in schema if f.name not in {"image_id", "uri"}])


# -- row problems -----------------------------------------------------------------------------------
# Found in two halves so that a manifest of millions of rows never gathers its ids on one machine:
# the problems of a row on its own; duplicate ids across a whole manifest are found by the manifest
# reader (vbatch.operators.manifest), which never gathers the ids on the driver
KEY_OK, ID_NULL, ID_EMPTY, URI_EMPTY = 0, 1, 2, 3


def key_problems(image_ids: pa.Array, uris: pa.Array) -> np.ndarray:
    """A ``uint8`` code per row: ``ID_NULL``, ``ID_EMPTY`` (only whitespace), ``URI_EMPTY`` (null or
    only whitespace) or ``KEY_OK``."""
    ids = pa.array(image_ids, pa.string())
    us = pa.array(uris, pa.string())

    def blank(a: pa.Array) -> np.ndarray:
        trimmed = pc.utf8_trim_whitespace(a.fill_null(""))
        return pc.equal(pc.utf8_length(trimmed), 0).to_numpy(zero_copy_only=False)

    codes = np.full(len(ids), KEY_OK, np.uint8)
    codes[blank(us)] = URI_EMPTY
    codes[blank(ids)] = ID_EMPTY
    codes[ids.is_null().to_numpy(zero_copy_only=False)] = ID_NULL
    return codes


def key_error(
    row: int, code: int, image_id: str | None, first: int | None, id_name: str = "image_id"
) -> str | None:
    """The message of manifest row ``row`` (``first``: the earlier row with its id, if any;
    ``id_name``: the id column, ``video_id`` in a video manifest)."""
    if code == ID_NULL:
        return f"manifest row {row}: {id_name} is null"
    if code == ID_EMPTY:
        return f"manifest row {row}: {id_name} is empty"
    if first is not None:
        return (
            f"manifest row {row}: duplicate {id_name} {image_id!r} (first at row {first}, "
            "which is processed)"
        )
    if code == URI_EMPTY:
        return f"manifest row {row}: uri is empty"
    return None


#: the start of every :func:`key_error` message; its number is the manifest row
_KEY_ERROR_ROW = re.compile(r"^manifest row (\d+): ")


def key_error_row(message: str | None) -> int | None:
    """The manifest row a :func:`key_error` message names (``None`` for any other message): the
    one way to tell a result row of an unusable key (null, empty or duplicate id) from the row of
    its id, which resumed runs need (``jobs.resume``)."""
    match = _KEY_ERROR_ROW.match(message or "")
    return int(match.group(1)) if match else None


def image_row_errors(
    image_ids: Sequence[str | None], uris: Sequence[str | None], id_name: str = "image_id"
) -> list[str | None]:
    """Per-row problems of a manifest held in one place, in manifest order; ``None`` for a good row.

    Args:
        image_ids, uris: the two required columns of the whole manifest, in manifest order.

    Returns:
        One message or ``None`` per row. For a duplicate id the first occurrence is good and every
        later one is an error naming the first row (a duplicate with an empty uri is reported as
        a duplicate).
    """
    ids = pa.array(image_ids, pa.string())
    codes = key_problems(ids, pa.array(uris, pa.string()))
    values = ids.to_pylist()
    first: dict[str, int] = {}
    out: list[str | None] = []
    for row, (code, image_id) in enumerate(zip(codes.tolist(), values, strict=True)):
        earlier = None
        if code not in (ID_NULL, ID_EMPTY):
            earlier = first.setdefault(image_id, row)
            earlier = None if earlier == row else earlier
        out.append(key_error(row, code, image_id, earlier, id_name))
    return out


def validate_image_results(table: pa.Table, output: str, embedding_dim: int | None = None) -> None:
    """Check a results table: the columns and types of :func:`image_results_schema`, statuses, errors.

    Raises ``ValueError`` naming the column or the row.
    """
    expected = image_results_schema(output, embedding_dim=embedding_dim)
    for field in expected:
        if field.name not in table.column_names:
            raise ValueError(f"results: missing column {field.name!r}")
        if not table.schema.field(field.name).type.equals(field.type):
            raise ValueError(
                f"results: column {field.name!r} is {table.schema.field(field.name).type}, expected {field.type}"
            )
    for row, (status, error, error_class) in enumerate(
        zip(
            table.column("status").to_pylist(),
            table.column("error").to_pylist(),
            table.column("error_class").to_pylist(),
            strict=True,
        )
    ):
        if status not in (STATUS_OK, STATUS_ERROR):
            raise ValueError(f"results row {row}: status {status!r} is neither 'ok' nor 'error'")
        if (status == STATUS_ERROR) != (error is not None):
            raise ValueError(f"results row {row}: status {status!r} with error {error!r}")
        if (error is None) != (error_class is None) or (
            error_class is not None and error_class not in ERROR_CLASSES
        ):
            raise ValueError(f"results row {row}: error {error!r} with error_class {error_class!r}")
