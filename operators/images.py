"""CPU stages for images: fetch bytes, then decode and preprocess for the model.

Both are stateless functions over ``pyarrow.Table`` batches (``batch_format="pyarrow"``), so
passthrough columns travel untouched, whatever their types. A row that already carries an error is
passed along unchanged; a row that fails here gets its error and goes on. Nothing is dropped.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from vbatch.models.base import Transforms
from vbatch.models.matting.transforms import MattingTransforms, fit_long_side
from vbatch.models.reid.transforms import ReidTransforms
from vbatch.models.salient.transforms import SalientTransforms
from vbatch.models.shop_seg.transforms import ShopSegTransforms, crop_size
from vbatch.operators.columns import encode_array, set_column
from vbatch.operators.decode import DEFAULT_MAX_PIXELS, DecodeError, open_image, probe_jpeg
from vbatch.operators.defaults import DECODE_MODES
from vbatch.operators.manifest import ERROR
from vbatch.operators.storage import Storage, describe_read_error, resolve
from vbatch.schemas.images import INTERNAL_PREFIX

logger = logging.getLogger(__name__)

BYTES = f"{INTERNAL_PREFIX}bytes"  # large_binary: the fetched file
INPUT = f"{INTERNAL_PREFIX}input"  # large_binary: one preprocessed network input, .npy encoded
OUTPUT = f"{INTERNAL_PREFIX}output"  # large_binary: one raw network output, .npy encoded

#: transforms whose preprocessing resizes a Pillow image: they take the decoded image as it is
_PIL_INPUT = (SalientTransforms, ShopSegTransforms, ReidTransforms)


def network_size(transforms: Transforms, size: tuple[int, int]) -> tuple[int, int] | None:
    """(height, width) the image of ``size`` is resized to before the network, or ``None`` when
    the model does not say (then it is decoded at full size).

    Args:
        transforms: the model's transforms.
        size: (height, width) of the original image.
    """
    if isinstance(transforms, SalientTransforms):
        return transforms.norm_size
    if isinstance(transforms, ShopSegTransforms):
        return crop_size(size[0], size[1], transforms.image_size)
    if isinstance(transforms, ReidTransforms):
        return (int(transforms.image_size[0]), int(transforms.image_size[1]))
    if isinstance(transforms, MattingTransforms):
        return fit_long_side(size[0], size[1], transforms.max_side)
    return None


def _decode_for(
    blob: bytes, transforms: Transforms, max_pixels: int, mode: str
) -> tuple[np.ndarray, tuple[int, int]]:
    """(network input, original (H, W)) of one file, decoded in ``mode``.

    Both modes then run the model's own resize: in fast mode it starts from the DCT-scaled JPEG,
    at most 2× (per side) the network's size below 8× reduction, so it costs a fraction of the full
    one — about what an OpenCV area resize costs, and closer to the reference's pixels (measured,
    docs/BENCHMARKS.md).
    """
    if mode == "gpu":
        size = probe_jpeg(blob, max_pixels)
        if size is not None:  # the file itself, a 1-D uint8 array: the model actor decodes it
            return np.frombuffer(blob, dtype=np.uint8), size
    min_size = (lambda hw: network_size(transforms, hw)) if mode == "fast" else None
    decoded = open_image(blob, max_pixels, min_size=min_size)
    pil_ok = isinstance(transforms, _PIL_INPUT) and not isinstance(decoded.image, np.ndarray)
    # Pillow-resizing models get the decoded Pillow image: same pixels, two full-size copies fewer
    image = decoded.image if pil_ok else decoded.array()
    return transforms.preprocess(image), decoded.size  # type: ignore[arg-type]


def _fetch_one(storage: Storage, uri: str, base_uri: str) -> tuple[bytes | None, str | None]:
    try:
        uri = resolve(uri, base_uri)
        return storage.read_bytes(uri), None
    except Exception as e:  # unsupported scheme, missing, storage down…: the row fails, not the job
        return None, describe_read_error(e, uri)


def fetch_bytes(
    batch: pa.Table, *, storage: Storage, base_uri: str, io_threads: int = 16
) -> pa.Table:
    """Read each row's ``uri`` (resolved against the manifest folder) into ``_vb_bytes``.

    Reads run on ``io_threads`` threads: object-store latency, not CPU, bounds this stage.
    """
    uris = batch.column("uri").to_pylist()
    errors = batch.column(ERROR).to_pylist()
    todo = [i for i, e in enumerate(errors) if e is None]
    data: list[bytes | None] = [None] * len(uris)
    if todo:
        with ThreadPoolExecutor(max_workers=min(io_threads, len(todo))) as pool:
            results = pool.map(lambda i: _fetch_one(storage, uris[i].strip(), base_uri), todo)
            for i, (blob, err) in zip(todo, results, strict=True):
                data[i], errors[i] = blob, err
    batch = set_column(batch, BYTES, pa.array(data, pa.large_binary()))
    return set_column(batch, ERROR, pa.array(errors, pa.string()))


def decode_and_preprocess(
    batch: pa.Table,
    *,
    transforms: Transforms,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    keep_bytes: bool = False,
    decode: str = "exact",
) -> pa.Table:
    """Decode ``_vb_bytes`` to RGB, record the original size, preprocess into ``_vb_input``.

    Drops ``_vb_bytes`` unless ``keep_bytes`` (a product that needs the original pixels, such as a
    full-resolution cut-out, decodes the file again in the write stage rather than shipping
    decoded pixels, ~10× larger, through the object store).

    ``decode="fast"`` decodes JPEGs at the smallest DCT scale at least as large as the network's
    input, then resizes as exact mode does: approximate network inputs for a fraction of the CPU
    (see docs/BENCHMARKS.md for the deviation per task); other formats decode exactly as in "exact".

    ``decode="gpu"`` reads only the header of an RGB or greyscale JPEG and ships the file as its
    ``_vb_input``: the model actor decodes and resizes it on its device
    (:mod:`vbatch.operators.device_decode`). Other files are decoded here as in "exact".
    """
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
    errors = batch.column(ERROR).to_pylist()
    blobs = batch.column(BYTES).to_pylist()
    widths: list[int | None] = [None] * len(errors)
    heights: list[int | None] = [None] * len(errors)
    inputs: list[bytes | None] = [None] * len(errors)
    for i, (blob, err) in enumerate(zip(blobs, errors, strict=True)):
        if err is not None:
            continue
        try:
            net_input, (heights[i], widths[i]) = _decode_for(blob, transforms, max_pixels, decode)
        except DecodeError as e:
            errors[i] = str(e)
            continue
        except MemoryError:
            raise
        except Exception as e:  # a model's preprocessing refusing an image is a row error
            logger.exception("preprocess failed")
            errors[i] = f"preprocess failed: {type(e).__name__}: {e}"
            continue
        inputs[i] = encode_array(net_input)
    if not keep_bytes:
        batch = batch.drop_columns([BYTES])
    batch = set_column(batch, "width", pa.array(widths, pa.int32()))
    batch = set_column(batch, "height", pa.array(heights, pa.int32()))
    batch = set_column(batch, INPUT, pa.array(inputs, pa.large_binary()))
    return set_column(batch, ERROR, pa.array(errors, pa.string()))
