"""Small helpers for the Arrow batches that travel between stages."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa


def encode_array(arr: np.ndarray) -> bytes:
    """An array as ``.npy`` bytes: shape and dtype travel with the data through Arrow columns."""
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def decode_array(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def set_column(batch: pa.Table, name: str, values: pa.Array) -> pa.Table:
    """Replace column ``name`` or append it."""
    if name in batch.column_names:
        return batch.set_column(batch.column_names.index(name), name, values)
    return batch.append_column(name, values)
