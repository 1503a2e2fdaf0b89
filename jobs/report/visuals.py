"""Thumbnails of a row's input and outputs as people inspect them.

Saliency as a heat-map over the image, binary masks as an outline, matting cut-outs on a
checkerboard (transparency visible) and the composite. Every picture is a small JPEG; none is
larger than :data:`THUMB` pixels on its long side.
"""

from __future__ import annotations

import io
import logging

import cv2
import numpy as np
from PIL import Image, ImageOps

from vbatch.operators.storage import Storage, resolve

logger = logging.getLogger(__name__)

#: long side of every thumbnail, px
THUMB = 220
#: outline colour (RGB): magenta reads on photos and on white product backgrounds
OUTLINE = (255, 0, 200)


def fit(image: np.ndarray, side: int = THUMB) -> np.ndarray:
    """``image`` scaled down (area interpolation) so that its long side is at most ``side``."""
    h, w = image.shape[:2]
    scale = side / max(h, w)
    if scale >= 1:
        return image
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def read_rgb(data: bytes, side: int = THUMB) -> np.ndarray:
    """Image bytes → (h, w, 3) uint8 RGB thumbnail, upright (EXIF orientation applied, as the
    job does). JPEGs are decoded at a reduced DCT scale, so a large photo costs little."""
    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (side * 2, side * 2))
        upright = ImageOps.exif_transpose(img)
        upright.thumbnail((side, side))
        if upright.mode in ("I;16", "I;16B", "I", "F"):
            arr = np.asarray(upright, np.float64)
            upright = Image.fromarray((arr * 255 / max(arr.max(), 1)).astype(np.uint8))
        return np.asarray(upright.convert("RGB"))


def read_grey(data: bytes, shape: tuple[int, int] | None = None) -> np.ndarray:
    """PNG/JPEG bytes → (h, w) uint8 grey, resized to ``shape`` (h, w) when given."""
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    if arr is None:
        raise ValueError("not a decodable image")
    return resize(arr, shape) if shape else fit(arr)


def read_rgba(data: bytes, shape: tuple[int, int] | None = None) -> np.ndarray:
    """PNG bytes of a cut-out → (h, w, 4) RGBA, resized to ``shape`` when given."""
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.ndim != 3 or arr.shape[2] != 4:
        raise ValueError("not an RGBA PNG")
    arr = cv2.cvtColor(arr, cv2.COLOR_BGRA2RGBA)
    return resize(arr, shape) if shape else fit(arr)


def resize(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if image.shape[:2] == shape:
        return image
    return cv2.resize(image, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)


def heat_overlay(rgb: np.ndarray, mask: np.ndarray, weight: float = 0.55) -> np.ndarray:
    """A soft mask as a JET heat-map blended over the image (``weight``: the heat-map's share)."""
    heat = cv2.cvtColor(
        cv2.applyColorMap(resize(mask, rgb.shape[:2]), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB
    )
    return cv2.addWeighted(rgb, 1 - weight, heat, weight, 0)


def outline(rgb: np.ndarray, mask: np.ndarray, thickness: int = 2) -> np.ndarray:
    """A binary mask's contours (> 127) drawn over the image."""
    binary = (resize(mask, rgb.shape[:2]) > 127).astype(np.uint8)
    contours, _ = cv2.findContours(binary, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    out = np.ascontiguousarray(rgb.copy())
    cv2.drawContours(out, contours, -1, OUTLINE, thickness)
    return out


def checkerboard(shape: tuple[int, int], square: int = 8) -> np.ndarray:
    """(h, w, 3) light-grey checkerboard, the usual backdrop that shows transparency."""
    yy, xx = np.indices(shape)
    light = ((yy // square + xx // square) % 2).astype(bool)
    board = np.where(light, 204, 153).astype(np.uint8)
    return np.repeat(board[..., None], 3, axis=2)


def on_checkerboard(rgba: np.ndarray) -> np.ndarray:
    """An RGBA cut-out composited over a checkerboard → RGB."""
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    board = checkerboard(rgba.shape[:2]).astype(np.float32)
    return (rgba[..., :3] * alpha + board * (1 - alpha)).round().astype(np.uint8)


def grey_to_rgb(mask: np.ndarray) -> np.ndarray:
    return np.repeat(mask[..., None], 3, axis=2)


def encode_jpeg(rgb: np.ndarray, quality: int = 85) -> bytes:
    ok, buf = cv2.imencode(
        ".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    if not ok:
        raise ValueError(f"JPEG encoding failed for shape {rgb.shape}")
    return buf.tobytes()


def _visual(task: str | None) -> str | None:
    """How the report draws ``task``'s products (its registry entry's ``visual``)."""
    from vbatch.models.registry import REGISTRY

    entry = REGISTRY.get(task or "")
    return entry.visual if entry is not None else None


def row_panels(
    row: dict, task: str | None, storage: Storage, base_uri: str
) -> tuple[list[tuple[str, np.ndarray]], list[str]]:
    """The pictures of one result row: ``[(caption, rgb)]`` and the problems met (a missing
    input or product becomes a note, never an exception).

    Args:
        row: the row's detail columns (:data:`vbatch.jobs.report.data.DETAIL`).
        task: the job's task; its registry entry's ``visual`` decides the drawing (heat-map,
            outline or matte); other tasks show the mask as it is.
        storage: reaches inputs and products. base_uri: resolves relative input URIs.
    """
    panels: list[tuple[str, np.ndarray]] = []
    notes: list[str] = []
    rgb = None
    uri = row.get("uri")
    if uri and not row.get("video_id"):
        try:
            rgb = read_rgb(storage.read_bytes(resolve(uri.strip(), base_uri)))
            panels.append(("input", rgb))
        except Exception as e:
            notes.append(f"input unreadable: {type(e).__name__}: {str(e)[:120]}")

    def product(key: str) -> bytes | None:
        value = row.get(key)
        if not value:
            return None
        try:
            return storage.read_bytes(value)
        except Exception as e:
            notes.append(f"{key} unreadable: {type(e).__name__}")
            return None

    shape = rgb.shape[:2] if rgb is not None else None
    mask = product("mask_uri") or product("matte_uri")
    if mask is not None:
        try:
            m = read_grey(mask, shape)
            visual = _visual(task)
            if rgb is not None and visual == "heatmap":
                panels.append(("saliency heat-map", heat_overlay(rgb, m)))
            elif rgb is not None and visual == "outline":
                panels.append(("mask outline", outline(rgb, m)))
            panels.append(("matte" if visual == "matte" else "mask", grey_to_rgb(m)))
        except Exception as e:
            notes.append(f"mask undecodable: {e}")
    cutout = product("cutout_uri")
    if cutout is not None:
        try:
            panels.append(("cut-out", on_checkerboard(read_rgba(cutout, shape))))
        except Exception as e:
            notes.append(f"cut-out undecodable: {e}")
    composite = product("composite_uri")
    if composite is not None:
        try:
            panels.append(("composite", read_rgb(composite)))
        except Exception as e:
            notes.append(f"composite undecodable: {e}")
    return panels, notes
