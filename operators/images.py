"""CPU stages for images: fetch bytes, then decode and preprocess for the model.

Both are stateless functions over ``pyarrow.Table`` batches (``batch_format="pyarrow"``), so
passthrough columns travel untouched, whatever their types. A row that already carries an error is
passed along unchanged; a row that fails here gets its error and goes on. Nothing is dropped.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa

from vbatch.models.base import Transforms
from vbatch.operators.columns import encode_array, set_column
from vbatch.operators.decode import DEFAULT_MAX_PIXELS, DecodeError, decode_image
from vbatch.operators.manifest import ERROR
from vbatch.operators.storage import Storage, describe_read_error, resolve
from vbatch.schemas.images import INTERNAL_PREFIX

logger = logging.getLogger(__name__)

BYTES = f"{INTERNAL_PREFIX}bytes"  # large_binary: the fetched file
INPUT = f"{INTERNAL_PREFIX}input"  # large_binary: one preprocessed network input, .npy encoded


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
) -> pa.Table:
    """Decode ``_vb_bytes`` to RGB, record the original size, preprocess into ``_vb_input``.

    Drops ``_vb_bytes`` unless ``keep_bytes`` (a product that needs the original pixels, such as a
    full-resolution cut-out, decodes the file again in the write stage rather than shipping
    decoded pixels, ~10× larger, through the object store).
    """
    errors = batch.column(ERROR).to_pylist()
    blobs = batch.column(BYTES).to_pylist()
    widths: list[int | None] = [None] * len(errors)
    heights: list[int | None] = [None] * len(errors)
    inputs: list[bytes | None] = [None] * len(errors)
    for i, (blob, err) in enumerate(zip(blobs, errors, strict=True)):
        if err is not None:
            continue
        try:
            image = decode_image(blob, max_pixels=max_pixels)
        except DecodeError as e:
            errors[i] = str(e)
            continue
        except MemoryError:
            raise
        except Exception as e:  # decode_image maps every failure it knows; this is a safety net
            logger.exception("decode failed")
            errors[i] = f"cannot decode: {type(e).__name__}: {e}"
            continue
        heights[i], widths[i] = image.shape[:2]
        try:
            inputs[i] = encode_array(transforms.preprocess(image))
        except MemoryError:
            raise
        except Exception as e:  # a model's preprocessing refusing an image is a row error
            logger.exception("preprocess failed")
            errors[i] = f"preprocess failed: {type(e).__name__}: {e}"
    if not keep_bytes:
        batch = batch.drop_columns([BYTES])
    batch = set_column(batch, "width", pa.array(widths, pa.int32()))
    batch = set_column(batch, "height", pa.array(heights, pa.int32()))
    batch = set_column(batch, INPUT, pa.array(inputs, pa.large_binary()))
    return set_column(batch, ERROR, pa.array(errors, pa.string()))
