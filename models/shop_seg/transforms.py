"""shop-seg CPU pre/post-processing, as ModelScope's ``ShopSegmentation.preprocess``/``postprocess`` do.

Reference: ModelScope 1.40.2 ``models/cv/shop_segmentation/shop_seg_model.py`` and
``pipelines/cv/shop_segmentation_pipleline.py``. Resizing is PIL bilinear on uint8 both ways, with the
reference's crop size ``int(S / max(h, w) * h)``. The CLIP normalisation and the zero padding (applied
*after* normalisation, bottom/right) are done on the device by :meth:`ShopSegNet.normalize`, from the
uint8 image and a validity channel produced here.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from vbatch.models.base import Transforms


def crop_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) of the image resized so that its long side is ``size``, truncated like the reference."""
    ratio = 1.0 * size / max(height, width)
    # at least one pixel: the reference crashes on a 0-pixel side (images > size:1 thin)
    return max(1, int(ratio * height)), max(1, int(ratio * width))


class ShopSegTransforms(Transforms):
    """Long-side resize into an S×S canvas, and the mask back at the original size.

    Args:
        image_size: S (1024 for the released model).
    """

    def __init__(self, image_size: int = 1024) -> None:
        self.image_size = image_size

    def preprocess(self, image: np.ndarray | Image.Image) -> np.ndarray:
        """
        Args:
            image: (H, W, 3) uint8 RGB, or a Pillow image in mode "RGB" (resized as it is).

        Returns:
            (S, S, 4) uint8: the resized image at the top left, zeros elsewhere; channel 3 is 255 where
            the image is and 0 on the padding.
        """
        if isinstance(image, Image.Image) and image.mode == "RGB":
            pil = image
        elif not isinstance(image, np.ndarray) or (
            image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8
        ):
            got = f"{image.shape} {image.dtype}" if isinstance(image, np.ndarray) else type(image)
            raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {got}")
        else:
            pil = Image.fromarray(image)
        s = self.image_size
        ch, cw = crop_size(pil.height, pil.width, s)
        resized = np.asarray(pil.resize((cw, ch), Image.Resampling.BILINEAR))
        out = np.zeros((s, s, 4), dtype=np.uint8)
        out[:ch, :cw, :3] = resized
        out[:ch, :cw, 3] = 255
        return out

    def postprocess(self, output: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """
        Args:
            output: (S, S) uint8 class map (1 = foreground) from the predictor.
            size: (H, W) of the original image.

        Returns:
            (H, W) uint8 mask, 0 or 255.
        """
        h, w = int(size[0]), int(size[1])
        ch, cw = crop_size(h, w, self.image_size)
        crop = np.where(output[:ch, :cw] != 0, 255, 0).astype(np.uint8)
        mask = np.asarray(Image.fromarray(crop).resize((w, h), Image.Resampling.BILINEAR))
        return np.where(mask >= 128, 255, 0).astype(np.uint8)
