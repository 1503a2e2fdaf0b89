"""Decoding: formats, modes, orientation and every failure turned into a message."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from vbatch.jobs.demo_data import encode, product_image
from vbatch.operators.decode import DecodeError, decode_image


def test_rgb_jpeg_matches_pillow() -> None:
    img = product_image(1, (64, 48))
    data = encode(img, quality=95)
    out = decode_image(data)
    assert out.shape == (48, 64, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def test_grayscale_becomes_three_equal_channels() -> None:
    grey = product_image(2, (40, 30))[..., 0]
    out = decode_image(encode(grey, "PNG"))
    assert out.shape == (30, 40, 3)
    np.testing.assert_array_equal(out[..., 0], grey)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_16bit_grey_and_rgb_png_are_scaled_not_clipped() -> None:
    a16 = np.linspace(0, 65535, 30 * 40).reshape(30, 40).astype(np.uint16)
    out = decode_image(cv2.imencode(".png", a16)[1].tobytes())
    np.testing.assert_array_equal(out[..., 1], (a16 >> 8).astype(np.uint8))
    rgb16 = np.stack([a16, a16 // 2, 65535 - a16], -1)
    out = decode_image(cv2.imencode(".png", rgb16[..., ::-1])[1].tobytes())
    np.testing.assert_array_equal(out, (rgb16 >> 8).astype(np.uint8))


def test_rgba_drops_alpha_and_cmyk_converts() -> None:
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 17
    out = decode_image(encode(rgba, "PNG"))
    assert out.shape == (10, 12, 3) and (out[..., 0] == 200).all()
    buf = io.BytesIO()
    Image.new("CMYK", (8, 6), (0, 255, 255, 0)).save(buf, "JPEG", quality=100)
    assert tuple(decode_image(buf.getvalue())[0, 0]) == pytest.approx((255, 0, 0), abs=3)


def test_exif_orientation_is_applied() -> None:
    img = product_image(3, (60, 20))  # landscape pixels…
    pil = Image.fromarray(img)
    exif = pil.getexif()
    exif[0x0112] = 6  # …shown rotated 90° clockwise
    buf = io.BytesIO()
    pil.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    out = decode_image(buf.getvalue())
    assert out.shape == (60, 20, 3)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty file"),
        (b"name,price\nshoe,10\n", "not a recognised image"),
        (encode(product_image(4, (64, 64)))[:300], "corrupt or truncated"),
    ],
)
def test_bad_bytes_give_clear_errors(data: bytes, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        decode_image(data)


def test_pixel_cap_is_checked_before_decoding() -> None:
    # a 20000x20000 PNG of zeros is ~1 MB encoded but 1.2 GB decoded
    img = Image.new("L", (20000, 20000))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    with pytest.raises(DecodeError, match=r"20000x20000 = 400,000,000 pixels exceeds the cap"):
        decode_image(buf.getvalue())
    with pytest.raises(DecodeError, match="exceeds the cap of 100"):
        decode_image(encode(product_image(5, (20, 20))), max_pixels=100)
