"""The last per-image stage: postprocess on the CPU, write the products, shape the result rows.

Products get deterministic names from the image id (``<out>/masks/<id>.png``), written atomically,
so a repeated run overwrites instead of duplicating. Ids that are not safe file names are
percent-encoded; no id can reach outside its folder.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import urllib.parse
from dataclasses import dataclass

import cv2
import numpy as np
import pyarrow as pa

from models.base import Transforms
from operators.columns import decode_array
from operators.inference import OUTPUT
from operators.manifest import ERROR
from operators.storage import Storage, join
from schemas.images import (
    COMMON_RESULT_FIELDS,
    INTERNAL_PREFIX,
    STATUS_ERROR,
    STATUS_OK,
    image_results_schema,
)

logger = logging.getLogger(__name__)

_MAX_NAME = 200


def safe_name(image_id: str) -> str:
    """A file name for ``image_id``: itself when safe, else percent-encoded (and hashed if long).

    ``/``, ``\\``, ``%`` and every other byte outside ``[A-Za-z0-9._-]`` are encoded, and a
    leading dot is encoded, so ``..``, ``/etc/passwd`` or ``a/../../b`` stay one plain name.
    """
    name = urllib.parse.quote(image_id, safe="-_.")
    if name.startswith("."):
        name = "%2E" + name[1:]
    if len(name) > _MAX_NAME:
        digest = hashlib.sha256(image_id.encode()).hexdigest()[:16]
        name = f"{name[: _MAX_NAME - 17]}-{digest}"
    return name


def encode_png(image: np.ndarray) -> bytes:
    """8-bit grey (H, W) or RGBA (H, W, 4) → PNG bytes."""
    if image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_RGBA2BGRA)
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise ValueError(f"PNG encoding failed for an array of shape {image.shape}")
    return buf.tobytes()


@dataclass(frozen=True)
class OutputOptions:
    """Where and how products are written."""

    out_uri: str
    task: str
    #: the model's output kind: "mask", "rgba", "embedding"
    output: str


def _write_mask(product: np.ndarray, image_id: str, opts: OutputOptions, storage: Storage) -> dict:
    if product.dtype != np.uint8 or product.ndim != 2:
        raise ValueError(
            f"model produced a {product.dtype} array of shape {product.shape}, expected a uint8 mask"
        )
    uri = join(opts.out_uri, "masks", safe_name(image_id) + ".png")
    storage.write_bytes(uri, encode_png(product))
    return {"mask_uri": uri}


WRITERS = {"mask": _write_mask}


def write_products(
    batch: pa.Table, *, transforms: Transforms, options: OutputOptions, storage: Storage
) -> pa.Table:
    """Postprocess each ok row's raw output, write its products, and return the result rows.

    Returns:
        A table in :func:`schemas.images.image_results_schema` order plus the passthrough columns;
        internal columns are dropped. One row out per row in.
    """
    writer = WRITERS[options.output]
    n = batch.num_rows
    errors = batch.column(ERROR).to_pylist()
    raw = batch.column(OUTPUT).to_pylist()
    ids = batch.column("image_id").to_pylist()
    widths = batch.column("width").to_pylist()
    heights = batch.column("height").to_pylist()
    extra_names = [f.name for f in image_results_schema(options.output)][
        len(COMMON_RESULT_FIELDS) :
    ]
    extra: dict[str, list] = {name: [None] * n for name in extra_names}
    for i in range(n):
        if errors[i] is not None:
            continue
        if raw[i] is None:  # a bug upstream, never a silent success
            errors[i] = "internal error: no model output for this row"
            continue
        try:
            product = transforms.postprocess(decode_array(raw[i]), (heights[i], widths[i]))
            for key, value in writer(product, ids[i], options, storage).items():
                extra[key][i] = value
        except Exception as e:
            logger.exception("writing the product of %r failed", ids[i])
            errors[i] = f"postprocess/write failed: {type(e).__name__}: {e}"

    now = dt.datetime.now(dt.timezone.utc)
    columns = {
        "image_id": batch.column("image_id"),
        "uri": batch.column("uri"),
        "task": pa.array([options.task] * n, pa.string()),
        "status": pa.array([STATUS_OK if e is None else STATUS_ERROR for e in errors], pa.string()),
        "error": pa.array(errors, pa.string()),
        "width": batch.column("width"),
        "height": batch.column("height"),
        "model_version": batch.column("model_version"),
        "processed_at": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
    }
    schema = image_results_schema(options.output)
    arrays = [
        columns[f.name] if f.name in columns else pa.array(extra[f.name], f.type) for f in schema
    ]
    passthrough = [
        c for c in batch.column_names if not c.startswith(INTERNAL_PREFIX) and c not in schema.names
    ]
    table = pa.Table.from_arrays(arrays, schema=schema)
    for name in passthrough:
        table = table.append_column(batch.schema.field(name), batch.column(name))
    return table
