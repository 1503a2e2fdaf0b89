"""No exception escapes one row's decoding: hostile files become that row's error.

A seeded fuzz over mutations of valid files in several formats (bounded: a few hundred cases, a few
seconds), plus the regressions that fuzzing found.
"""

from __future__ import annotations

import io
import random
import struct

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from vbatch.jobs.demo_data import product_image
from vbatch.operators.decode import DecodeError, decode_image
from vbatch.operators.images import BYTES, INPUT, decode_and_preprocess
from vbatch.operators.manifest import ERROR

FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP", "DDS", "ICO", "TGA", "PPM")


def _dds_unknown_pixel_format() -> bytes:
    """A DDS header whose pixel-format flags are 0: Pillow raises ``NotImplementedError``."""
    header = bytearray(124)
    struct.pack_into("<7I", header, 0, 124, 0x1007, 8, 8, 0, 0, 0)  # size, flags, h, w, …
    struct.pack_into("<2I", header, 72, 32, 0)  # pixel format: size 32, flags 0
    return b"DDS " + bytes(header) + bytes(256)


def _valid(fmt: str, seed: int) -> bytes:
    rgb = product_image(seed, (24 + seed % 9, 16 + seed % 7))
    img = Image.fromarray(rgb)
    if fmt == "GIF":
        img = img.convert("P")
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    kind = rng.randrange(4)
    if kind == 0:  # flip bytes, mostly in the header where parsers branch
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(min(len(b), 96)) if rng.random() < 0.7 else rng.randrange(len(b))
            b[i] = rng.randrange(256)
    elif kind == 1:  # truncate
        b = b[: rng.randrange(1, len(b))]
    elif kind == 2:  # splice in random bytes
        i = rng.randrange(len(b))
        b[i:i] = rng.randbytes(rng.randint(1, 32))
    else:  # overwrite a 4-byte field with an extreme value (sizes, offsets, counts)
        i = rng.randrange(max(1, min(len(b) - 4, 64)))
        b[i : i + 4] = struct.pack("<I", rng.choice([0, 1, 0x7FFFFFFF, 0xFFFFFFFF, 65535]))
    return bytes(b)


def test_dds_unknown_pixel_format_is_a_row_error() -> None:
    with pytest.raises(
        DecodeError, match=r"cannot decode: NotImplementedError: Unknown pixel format"
    ):
        decode_image(_dds_unknown_pixel_format())


def test_fuzzed_files_never_raise_anything_but_decode_error() -> None:
    rng = random.Random(20261129)
    valid = [_valid(fmt, i) for i, fmt in enumerate(FORMATS)]
    outcomes = {"decoded": 0, "error": 0}
    for n in range(400):
        data = _mutate(valid[n % len(valid)], rng)
        try:
            out = decode_image(data, max_pixels=4096 * 4096)
        except DecodeError as e:
            assert str(e), "an error row needs a message"
            outcomes["error"] += 1
        else:
            assert out.ndim == 3 and out.shape[2] == 3 and out.dtype == np.uint8
            outcomes["decoded"] += 1
    # the fuzz exercises both paths, or it tests nothing
    assert outcomes["decoded"] > 20 and outcomes["error"] > 20, outcomes


class _Identity:
    def preprocess(self, image: np.ndarray) -> np.ndarray:
        return image[:4, :4]


class _Refuses:
    def preprocess(self, image: np.ndarray) -> np.ndarray:
        raise NotImplementedError("no such mode")


def test_decode_stage_turns_every_failure_into_its_row_error() -> None:
    good = _valid("PNG", 1)
    blobs = [good, _dds_unknown_pixel_format(), b"", good[:40], good]
    batch = pa.table(
        {
            "image_id": [f"r{i}" for i in range(len(blobs))],
            BYTES: pa.array(blobs, pa.large_binary()),
            ERROR: pa.array([None] * len(blobs), pa.string()),
        }
    )
    out = decode_and_preprocess(batch, transforms=_Identity())  # type: ignore[arg-type]
    errors = out.column(ERROR).to_pylist()
    assert errors[0] is None and errors[4] is None
    assert "NotImplementedError" in errors[1]
    assert errors[2] == "empty file (0 bytes)"
    assert errors[3] is not None
    assert out.column(INPUT).to_pylist()[1] is None

    out = decode_and_preprocess(batch, transforms=_Refuses())  # type: ignore[arg-type]
    errors = out.column(ERROR).to_pylist()
    assert errors[0] == "preprocess failed: NotImplementedError: no such mode"
