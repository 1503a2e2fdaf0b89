"""The last per-image stage: postprocess on the CPU, write the products, shape the result rows.

Products get deterministic names from the image id (``<out>/masks/<id>.png``), written atomically,
so a repeated run overwrites instead of duplicating. Ids that are not safe file names are
percent-encoded; no id can reach outside its folder.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import logging
import struct
import urllib.parse
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
from zlib_ng import zlib_ng as zng

from vbatch.models.base import Transforms
from vbatch.operators.columns import decode_array
from vbatch.operators.decode import decode_image
from vbatch.operators.images import BYTES, OUTPUT
from vbatch.operators.manifest import ERROR
from vbatch.operators.quality import GT_COLUMN, GT_ERROR, metric_kind, score_row
from vbatch.operators.reuse import FINGERPRINT
from vbatch.operators.storage import Storage, join
from vbatch.schemas.errors import classify_errors
from vbatch.schemas.images import (
    COMMON_RESULT_FIELDS,
    INTERNAL_PREFIX,
    OUTPUT_FIELDS,
    STATUS_ERROR,
    STATUS_OK,
    image_results_schema,
    metric_fields,
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


#: PNG settings chosen by measurement (docs/BENCHMARKS.md, "CPU stages"). Grey masks: our own
#: writer (:func:`_encode_grey_png`): UP filter, zlib-ng's RLE deflate at level 1 — 1.5x faster
#: than the same settings in OpenCV's zlib for soft saliency maps, 4x for binary masks, same
#: size. RGBA cut-outs (photo pixels, hardly compressible): OpenCV, Huffman-only coding, ~13 %
#: faster than RLE at the same size.
PNG_RGBA_PARAMS = (
    cv2.IMWRITE_PNG_COMPRESSION, 1,
    cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_SUB,
    cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY,
)  # fmt: skip
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_FILTER_NONE, _PNG_FILTER_UP = 0, 2


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zng.crc32(data, zng.crc32(kind)))
    )


def _encode_grey_png(image: np.ndarray) -> bytes:
    """8-bit grey (H, W) → PNG: row 0 unfiltered, every other row UP-filtered (the byte above
    subtracted, modulo 256), one IDAT deflated by zlib-ng (RLE strategy, level 1)."""
    h, w = image.shape
    rows = np.empty((h, w + 1), dtype=np.uint8)
    rows[:, 0] = _PNG_FILTER_UP
    rows[0, 0] = _PNG_FILTER_NONE
    rows[0, 1:] = image[0]
    np.subtract(image[1:], image[:-1], out=rows[1:, 1:])  # uint8: wraps modulo 256
    deflate = zng.compressobj(1, zng.DEFLATED, zng.MAX_WBITS, 8, zng.Z_RLE)
    idat = deflate.compress(rows) + deflate.flush()
    header = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)  # 8-bit grey, deflate, no interlace
    return b"".join(
        (
            _PNG_SIGNATURE,
            _png_chunk(b"IHDR", header),
            _png_chunk(b"IDAT", idat),
            _png_chunk(b"IEND", b""),
        )
    )


#: mask sizes: "full" = the original image's size; "model" = the network's resolution
MASK_SIZES = ("full", "model")


def encode_png(image: np.ndarray) -> bytes:
    """8-bit grey (H, W) or RGBA (H, W, 4) → PNG bytes (lossless: decodes to the same pixels)."""
    if image.ndim == 2 and image.dtype == np.uint8 and image.size:
        return _encode_grey_png(np.ascontiguousarray(image))
    if not (image.ndim == 3 and image.shape[2] == 4):
        raise ValueError(f"expected an 8-bit grey or RGBA array, got shape {image.shape}")
    image = cv2.cvtColor(image, cv2.COLOR_RGBA2BGRA)
    ok, buf = cv2.imencode(".png", image, list(PNG_RGBA_PARAMS))
    if not ok:
        raise ValueError(f"PNG encoding failed for an array of shape {image.shape}")
    return buf.tobytes()


def model_resolution_mask(
    transforms: Transforms, output: np.ndarray, size: tuple[int, int]
) -> np.ndarray:
    """The final mask at the network's resolution (``--mask-size model``).

    Upsampling it to ``size`` gives exactly the full-size mask: salient with
    ``cv2.resize(mask, (W, H), interpolation=cv2.INTER_LINEAR)``; shop-seg with Pillow's bilinear
    ``Image.resize((W, H), Image.BILINEAR)`` then ``255 where >= 128, else 0``.

    Args:
        transforms: the model's transforms (salient or shop-seg).
        output: the network's raw output for one image.
        size: (H, W) of the original image.

    Returns:
        (h, w) uint8 mask: salient ``norm_size``; shop-seg the resized image's area of the canvas.
    """
    from vbatch.models.salient.transforms import SalientTransforms
    from vbatch.models.shop_seg.transforms import ShopSegTransforms, crop_size

    if isinstance(transforms, SalientTransforms):
        return transforms.postprocess(output, output.shape[:2])
    if isinstance(transforms, ShopSegTransforms):
        ch, cw = crop_size(int(size[0]), int(size[1]), transforms.image_size)
        return np.where(output[:ch, :cw] != 0, 255, 0).astype(np.uint8)
    raise ValueError(f"--mask-size model is not available for {type(transforms).__name__}")


def encode_jpeg(rgb: np.ndarray, quality: int = 92) -> bytes:
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError(f"JPEG encoding failed for an array of shape {rgb.shape}")
    return buf.tobytes()


@dataclass(frozen=True)
class OutputOptions:
    """Where and how products are written."""

    #: the folder products are written under (a run's own ``<out>/products/<run id>``)
    out_uri: str
    task: str
    #: the model's output kind: "mask", "rgba", "embedding"
    output: str
    #: rgba only: composite the cut-out over this colour (#RRGGBB, r,g,b) or image URI (JPEG out)
    background: str | None = None
    #: "embedding" only: the vector length
    embedding_dim: int | None = None
    #: "mask" only: "full" (original size) or "model" (the network's resolution, see
    #: :func:`model_resolution_mask`); the results' width/height stay the original's
    mask_size: str = "full"
    #: the manifest's folder: relative ground-truth URIs (``gt_mask_uri``) resolve against it
    base_uri: str = ""

    @property
    def product_columns(self) -> tuple[str, ...]:
        """The result columns of this output that hold product URIs."""
        return tuple(f.name for f in OUTPUT_FIELDS.get(self.output, []) if f.name.endswith("_uri"))


def is_color(value: str) -> bool:
    """``#RRGGBB``, ``RRGGBB`` or ``r,g,b``; anything else is taken as an image URI."""
    text = value.strip().lstrip("#")
    if "," in text:
        return all(p.strip().isdigit() for p in text.split(","))
    return len(text) == 6 and all(c in "0123456789abcdefABCDEF" for c in text)


@functools.lru_cache(maxsize=4)
def _background_image(uri: str, storage: Storage) -> np.ndarray:
    return decode_image(storage.read_bytes(uri))


def _write_mask(product: np.ndarray, image_id: str, opts: OutputOptions, storage: Storage) -> dict:
    if product.dtype != np.uint8 or product.ndim != 2:
        raise ValueError(
            f"model produced a {product.dtype} array of shape {product.shape}, expected a uint8 mask"
        )
    uri = join(opts.out_uri, "masks", safe_name(image_id) + ".png")
    storage.write_bytes(uri, encode_png(product))
    return {"mask_uri": uri, "foreground_ratio": float(product.mean(dtype=np.float64) / 255.0)}


def _write_rgba(product: np.ndarray, image_id: str, opts: OutputOptions, storage: Storage) -> dict:
    from vbatch.models.matting.transforms import alpha_of, composite

    alpha = alpha_of(product)
    name = safe_name(image_id)
    row: dict[str, Any] = {
        "matte_uri": join(opts.out_uri, "mattes", name + ".png"),
        "cutout_uri": join(opts.out_uri, "cutouts", name + ".png"),
        "foreground_ratio": float(alpha.mean(dtype=np.float64) / 255.0),
    }
    storage.write_bytes(row["matte_uri"], encode_png(alpha))
    storage.write_bytes(row["cutout_uri"], encode_png(product))
    if opts.background:
        bg = (
            opts.background
            if is_color(opts.background)
            else _background_image(opts.background, storage)
        )
        row["composite_uri"] = join(opts.out_uri, "composites", name + ".jpg")
        storage.write_bytes(row["composite_uri"], encode_jpeg(composite(product, bg)))
    return row


def _write_embedding(
    product: np.ndarray, image_id: str, opts: OutputOptions, storage: Storage
) -> dict:
    vec = np.asarray(product, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(vec))
    if not np.isfinite(norm) or norm == 0.0:
        raise ValueError(f"embedding has norm {norm}; cannot normalise it")
    # normalised here so that inner product = cosine similarity in the index
    return {"embedding": vec / norm}


WRITERS = {"mask": _write_mask, "rgba": _write_rgba, "embedding": _write_embedding}


def write_products(
    batch: pa.Table, *, transforms: Transforms, options: OutputOptions, storage: Storage
) -> pa.Table:
    """Postprocess each ok row's raw output, write its products, and return the result rows.

    Returns:
        A table in :func:`vbatch.schemas.images.image_results_schema` order plus the passthrough columns;
        internal columns are dropped. One row out per row in.
    """
    writer = WRITERS[options.output]
    if options.mask_size not in MASK_SIZES:
        raise ValueError(f"mask_size must be one of {MASK_SIZES}, got {options.mask_size!r}")
    n = batch.num_rows
    errors = batch.column(ERROR).to_pylist()
    raw = batch.column(OUTPUT).to_pylist()
    ids = batch.column("image_id").to_pylist()
    widths = batch.column("width").to_pylist()
    heights = batch.column("height").to_pylist()
    blobs = batch.column(BYTES).to_pylist() if BYTES in batch.column_names else [None] * n
    schema = image_results_schema(options.output, embedding_dim=options.embedding_dim)
    extra_names = schema.names[len(COMMON_RESULT_FIELDS) :]
    extra: dict[str, list] = {name: [None] * n for name in extra_names}
    # ground truth in the manifest: score each product against it (never fails a row)
    kind = metric_kind(options.task)
    scored = GT_COLUMN in batch.column_names and kind is not None
    gt_uris = batch.column(GT_COLUMN).to_pylist() if scored else [None] * n
    metrics: dict[str, list] = {f.name: [None] * n for f in metric_fields(kind)}
    for i in range(n):
        if errors[i] is not None:
            continue
        if raw[i] is None:  # a bug upstream, never a silent success
            errors[i] = "internal error: no model output for this row"
            continue
        try:
            output, size = decode_array(raw[i]), (heights[i], widths[i])
            blob = blobs[i]
            if options.mask_size == "model" and options.output == "mask":
                product = model_resolution_mask(transforms, output, size)
            elif blob is not None and output.shape[:2] != size:
                # the network ran on a downscaled copy: products keep the original's pixels
                original = decode_image(blob, max_pixels=size[0] * size[1])
                product = transforms.postprocess(output, size, image=original)  # type: ignore[call-arg]
            else:
                product = transforms.postprocess(output, size)
            for key, value in writer(product, ids[i], options, storage).items():
                extra[key][i] = value
            if scored:
                values, metrics[GT_ERROR][i] = score_row(
                    options.task, product, gt_uris[i], options.base_uri, storage
                )
                for key, value in values.items():
                    metrics[key][i] = value
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
        "error_class": classify_errors(pa.array(errors, pa.string())),
        "width": batch.column("width"),
        "height": batch.column("height"),
        "model_version": batch.column("model_version"),
        "processed_at": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
        "source_fingerprint": (
            batch.column(FINGERPRINT)
            if FINGERPRINT in batch.column_names
            else pa.nulls(n, pa.string())
        ),
    }
    arrays = [
        columns[f.name] if f.name in columns else pa.array(extra[f.name], f.type) for f in schema
    ]
    passthrough = [
        c for c in batch.column_names if not c.startswith(INTERNAL_PREFIX) and c not in schema.names
    ]
    table = pa.Table.from_arrays(arrays, schema=schema)
    if scored:
        for f in metric_fields(kind):
            table = table.append_column(f, pa.array(metrics[f.name], f.type))
    for name in passthrough:
        table = table.append_column(batch.schema.field(name), batch.column(name))
    return table
