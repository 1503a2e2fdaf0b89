"""Decode image bytes to RGB uint8 on the CPU, turning every failure into a clear message.

Pillow does the decoding, as ModelScope's ``LoadImage`` does, so what the models see matches the
reference: EXIF orientation applied, palette/grey/alpha/CMYK converted to RGB. Pillow's own
``convert("RGB")`` clips 16- and 32-bit images instead of scaling them, so those are scaled here.
The pixel cap is checked from the header, before any pixel is decoded: a decompression bomb costs
a few bytes of reading, not gigabytes of memory.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vbatch.operators.defaults import DEFAULT_MAX_PIXELS


class DecodeError(ValueError):
    """Bytes that are not a usable image; the message goes into the result row."""


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale a high-bit-depth array to 0..255 by its dtype's range (not by its content)."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.uint16 or (arr.dtype.kind in "iu" and arr.max(initial=0) > 255):
        # 16-bit PNG/TIFF come as uint16 or as int32 holding 0..65535 (mode "I")
        return (np.clip(arr, 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)
    if arr.dtype.kind == "f":
        # float images (mode "F") are taken as 0..1 when they fit, else clipped to 0..255
        scale = 255.0 if float(np.nanmax(arr, initial=0.0)) <= 1.0 else 1.0
        return np.clip(np.nan_to_num(arr) * scale, 0, 255).astype(np.uint8)
    return np.clip(arr, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class Decoded:
    """One decoded image, before any copy into an array.

    ``image`` is a Pillow image in mode ``"RGB"`` when the file decodes to RGB (most JPEGs): the
    PIL-based preprocessing resizes it directly instead of going ndarray → PIL again, two full-size
    copies saved. Anything else (grey, palette, 16-bit, CMYK…) is already converted to an array.
    """

    image: Image.Image | np.ndarray
    #: (height, width) of the image at full resolution, orientation applied (the results' size)
    size: tuple[int, int]

    def array(self) -> np.ndarray:
        """(h, w, 3) uint8 RGB (smaller than ``size`` when decoded with ``min_size``)."""
        if isinstance(self.image, np.ndarray):
            return self.image
        return np.asarray(self.image, dtype=np.uint8).copy()


#: EXIF orientations that swap width and height (transpose, rotate 90/270, transverse)
_SWAPS_AXES = (5, 6, 7, 8)


def open_image(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    min_size: tuple[int, int] | Callable[[tuple[int, int]], tuple[int, int] | None] | None = None,
) -> Decoded:
    """Decode one encoded image, keeping an RGB result as a Pillow image (no copy).

    Args:
        data: the file's bytes (JPEG, PNG, WebP, TIFF, BMP, GIF — whatever Pillow reads).
        max_pixels: refuse images with more pixels than this (decompression bombs, huge scans).
        min_size: (height, width) the caller needs at least, orientation applied. A JPEG is then
            decoded at the smallest DCT scale (1/2, 1/4, 1/8) that is at least this large in both
            dimensions (``Image.draft``): approximate pixels, a fraction of the work. Other formats
            ignore it and decode at full size. A function is called with the full-resolution
            (height, width) from the header and returns it (or ``None``). ``None`` (the
            default): full size, exact.

    Returns:
        The decoded image and its full-resolution (height, width).

    Raises:
        DecodeError: empty, truncated, not an image, or over the pixel cap.
    """
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # Our cap, checked just below from the header, replaces Pillow's process-wide one (which
            # would refuse at open with a message that names no option).
            Image.MAX_IMAGE_PIXELS = None
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            _check_cap(width, height, max_pixels)
            orientation = img.getexif().get(0x0112, 1)
            swaps = orientation in _SWAPS_AXES
            size = (width, height) if swaps else (height, width)
            need = min_size(size) if callable(min_size) else min_size
            if need is not None:
                need_h, need_w = need[::-1] if swaps else need
                # a no-op for formats other than JPEG; never upscales (size stays ≥ the request)
                img.draft(None, (max(1, int(need_w)), max(1, int(need_h))))
            img.load()
            # exif_transpose copies the whole image even when there is nothing to do: only call it
            # when there is an orientation to apply (the pixels are the same either way)
            oriented = ImageOps.exif_transpose(img) if orientation not in (None, 1) else img
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError(f"not a recognised image format ({len(data)} bytes)") from None
    except Image.DecompressionBombError as e:  # only if a caller set Pillow's limit below ours
        raise DecodeError(f"image too large: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DecodeError(f"corrupt or truncated image: {e}") from None
    except MemoryError:
        raise  # the process is in trouble, not the row: let the job fail
    except Exception as e:
        # Pillow's plugins raise what they like on hostile input (NotImplementedError for a DDS
        # pixel format, struct.error, IndexError, ZeroDivisionError, …): that row's error
        raise DecodeError(f"cannot decode: {type(e).__name__}: {_first_line(e)}") from None

    if oriented.mode == "RGB":
        return Decoded(oriented, size)
    try:
        return Decoded(_to_rgb(oriented), size)
    except (OSError, ValueError) as e:
        raise DecodeError(f"corrupt or truncated image: {e}") from None
    except MemoryError:
        raise
    except Exception as e:
        raise DecodeError(f"cannot decode: {type(e).__name__}: {_first_line(e)}") from None


def probe_jpeg(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int] | None:
    """(height, width), orientation applied, of a JPEG that ``--decode gpu`` can hand to the model
    actor undecoded: read from the header alone, no pixel decoded.

    Returns ``None`` for anything else — another format, a CMYK JPEG, bytes Pillow cannot open —
    which the caller decodes on the CPU as usual (and reports, if it is broken).

    Raises:
        DecodeError: empty, or over the pixel cap (the same messages as :func:`open_image`).
    """
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = None  # our cap replaces Pillow's, as in open_image
            img = Image.open(io.BytesIO(data))
            if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                return None
            width, height = img.size
            _check_cap(width, height, max_pixels)
            orientation = img.getexif().get(0x0112, 1)
    except DecodeError:
        raise
    except MemoryError:
        raise
    except Exception:  # the CPU decode gives the file its proper error
        return None
    return (width, height) if orientation in _SWAPS_AXES else (height, width)


def _check_cap(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise DecodeError(
            f"image too large: {width}x{height} = {width * height:,} pixels exceeds the cap of "
            f"{max_pixels:,} (--max-pixels)"
        )


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode one encoded image at full size.

    Args:
        data: the file's bytes (JPEG, PNG, WebP, TIFF, BMP, GIF — whatever Pillow reads).
        max_pixels: refuse images with more pixels than this (decompression bombs, huge scans).

    Returns:
        (H, W, 3) uint8 RGB, EXIF orientation applied.

    Raises:
        DecodeError: empty, truncated, not an image, or over the pixel cap.
    """
    decoded = open_image(data, max_pixels)
    try:
        return decoded.array()
    except MemoryError:
        raise
    except Exception as e:  # pixels Pillow could not hand over
        raise DecodeError(f"cannot decode: {type(e).__name__}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e)
    return text.splitlines()[0] if text else ""


def _to_rgb(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8).copy()
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        grey = _to_uint8(np.asarray(img))
        return np.repeat(grey[:, :, None], 3, axis=2)
    # L, 1, P, RGBA/LA (alpha dropped, as ModelScope's LoadImage does), CMYK, YCbCr, LAB, …
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
