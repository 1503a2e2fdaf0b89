"""CPU pre/post-processing of the matting model, and the products made from its RGBA output.

The graph (``damo/cv_unet_image-matting``, see :mod:`vbatch.models.matting.model`) accepts any size; the
model card's working range is up to 2000 px on the long side, so larger images are matted
downscaled (``cv2.INTER_AREA``, the antialiasing OpenCV downscale) and the alpha is resized back
(``cv2.INTER_LINEAR``). The cut-out then carries the ORIGINAL full-resolution RGB with the upscaled
alpha: only the matte is approximate, never the pixels.

Products (the job writes them): :func:`alpha_of` (8-bit matte), :func:`cutout` (RGBA) and
:func:`composite` (the cut-out over a colour or a background image).
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from vbatch.models.base import Transforms

#: an RGB colour: "#RRGGBB", "r,g,b", or three 0..255 values
Color = Sequence[int] | str | np.ndarray


def fit_long_side(height: int, width: int, max_side: int) -> tuple[int, int]:
    """(h, w) scaled so that the long side is at most ``max_side`` (unchanged when it already is)."""
    long_side = max(height, width)
    if long_side <= max_side:
        return height, width
    scale = max_side / long_side
    return max(1, round(height * scale)), max(1, round(width * scale))


class MattingTransforms(Transforms):
    """Downscale above ``max_side``; resize the alpha back to the original size."""

    def __init__(self, max_side: int = 2000) -> None:
        if max_side < 1:
            raise ValueError(f"max_side must be positive, got {max_side}")
        self.max_side = max_side

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """Args: image: (H, W, 3) uint8 RGB.

        Returns:
            (h, w, 3) uint8 RGB with ``max(h, w) <= max_side`` (the image itself when small enough).
            It stays uint8 — 4× less to ship to the actor than float; the predictor casts it to the
            graph's float input (values 0..255, as ModelScope's pipeline feeds them).
        """
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected (H, W, 3) uint8 RGB, got {image.dtype} {image.shape}")
        h, w = fit_long_side(image.shape[0], image.shape[1], self.max_side)
        if (h, w) == image.shape[:2]:
            return image
        return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)

    def postprocess(
        self, output: np.ndarray, size: tuple[int, int], image: np.ndarray | None = None
    ) -> np.ndarray:
        """The graph's RGBA at the original size.

        Args:
            output: (h, w, 4) uint8 RGBA from the graph.
            size: (H, W) of the original image.
            image: the original (H, W, 3) uint8 RGB. Used only when the image was downscaled: the
                result then has these full-resolution pixels with the upscaled alpha. Without it,
                the RGB is the graph's, upscaled (blurred) — pass it whenever it is at hand.

        Returns:
            (H, W, 4) uint8 RGBA; exactly ``output`` when no resize happened.
        """
        height, width = int(size[0]), int(size[1])
        if output.shape[:2] == (height, width):
            return output
        alpha = cv2.resize(output[..., 3], (width, height), interpolation=cv2.INTER_LINEAR)
        if image is not None:
            if image.shape[:2] != (height, width):
                raise ValueError(f"image shape {image.shape} does not match size {size}")
            return cutout(image, alpha)
        rgb = cv2.resize(output[..., :3], (width, height), interpolation=cv2.INTER_LINEAR)
        return cutout(rgb, alpha)


def alpha_of(rgba: np.ndarray) -> np.ndarray:
    """Args: rgba: (H, W, 4) uint8. Returns: the (H, W) uint8 matte (255 = foreground)."""
    if rgba.ndim != 3 or rgba.shape[2] != 4:
        raise ValueError(f"expected (H, W, 4) RGBA, got shape {rgba.shape}")
    return np.ascontiguousarray(rgba[..., 3])


def cutout(image: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Args: image: (H, W, 3) uint8 RGB; alpha: (H, W) uint8. Returns: (H, W, 4) uint8 RGBA."""
    if image.shape[:2] != alpha.shape[:2] or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image {image.shape} and alpha {alpha.shape} do not match")
    return np.concatenate([image, alpha.reshape(*alpha.shape[:2], 1)], axis=-1).astype(np.uint8)


def parse_color(color: Color) -> np.ndarray:
    """``"#RRGGBB"``, ``"RRGGBB"``, ``"r,g,b"`` or a 3-sequence of 0..255 → (3,) float32 RGB."""
    if isinstance(color, str):
        text = color.strip().lstrip("#")
        if "," in text:
            parts = [int(p) for p in text.split(",")]
        elif len(text) == 6:
            parts = [int(text[i : i + 2], 16) for i in (0, 2, 4)]
        else:
            raise ValueError(f"cannot parse colour {color!r}: use #RRGGBB or r,g,b")
    else:
        parts = [int(c) for c in color]
    if len(parts) != 3 or not all(0 <= p <= 255 for p in parts):
        raise ValueError(f"colour {color!r} is not three values in 0..255")
    return np.asarray(parts, dtype=np.float32)


def composite(rgba: np.ndarray, background: Color) -> np.ndarray:
    """Alpha-blend a cut-out over a background: ``a·fg + (1 − a)·bg`` with ``a = alpha / 255``.

    Args:
        rgba: (H, W, 4) uint8 RGBA (straight, not premultiplied alpha — what the graph returns).
        background: a colour (see :func:`parse_color`) or an (h, w, 3) uint8 RGB image, resized to
            (H, W) with ``cv2.INTER_LINEAR`` when its size differs.

    Returns:
        (H, W, 3) uint8 RGB, rounded to nearest.
    """
    if rgba.ndim != 3 or rgba.shape[2] != 4:
        raise ValueError(f"expected (H, W, 4) RGBA, got shape {rgba.shape}")
    height, width = rgba.shape[:2]
    if isinstance(background, np.ndarray) and background.ndim == 3:
        if background.shape[2] != 3:
            raise ValueError(f"background image must be (h, w, 3) RGB, got {background.shape}")
        if background.shape[:2] != (height, width):
            background = cv2.resize(background, (width, height), interpolation=cv2.INTER_LINEAR)
        bg = background.astype(np.float32)
    else:
        bg = parse_color(background).reshape(1, 1, 3)
    a = rgba[..., 3:4].astype(np.float32) / 255.0
    out = a * rgba[..., :3].astype(np.float32) + (1.0 - a) * bg
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
