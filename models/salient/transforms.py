"""CPU pre/post-processing of the salient models, as ModelScope's ``SalientDetection`` does it.

Reference: ModelScope 1.40.2 ``models/cv/salient_detection/salient_model.py``:

* preprocess: ``torchvision.transforms.Resize(norm_size)`` on a PIL image (PIL bilinear with its
  antialiasing support, output (h, w) = ``norm_size``), then ``ToTensor`` and ``Normalize``. The
  resize is done here on uint8; ``/255`` and the normalisation run on the device
  (:class:`~vbatch.models.salient.SalientPredictor`), so that uint8 crosses to the GPU.
* postprocess: the first map is min-max normalised per image, ``*255`` and truncated to uint8
  (``astype('uint8')``), then resized with OpenCV's ``INTER_LINEAR`` to the original size. A constant
  map, which gives NaN in ModelScope (0/0), gives all zeros here.
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

from vbatch.models.base import Transforms


class SalientTransforms(Transforms):
    """Resize to the network's input size; turn a saliency map into an 8-bit mask."""

    def __init__(self, norm_size: tuple[int, int]) -> None:
        """Args: norm_size: (height, width) of the network input."""
        self.norm_size = (int(norm_size[0]), int(norm_size[1]))

    def preprocess(self, image: np.ndarray | Image.Image) -> np.ndarray:
        """Args: image: (H, W, 3) uint8 RGB, or a Pillow image in mode "RGB" (resized as it is,
        without the array round trip). Returns: (h, w, 3) uint8, (h, w) = ``norm_size``."""
        h, w = self.norm_size
        if isinstance(image, Image.Image) and image.mode == "RGB":
            pil = image
        elif not isinstance(image, np.ndarray) or (
            image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8
        ):
            raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {_describe(image)}")
        else:
            pil = Image.fromarray(np.ascontiguousarray(image))
        # PIL returns a copy when the size already matches, as torchvision's Resize does then too
        return np.asarray(pil.resize((w, h), Image.Resampling.BILINEAR))

    def postprocess(self, output: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """Args: output: (h, w) float saliency map; size: (H, W) of the original image.

        Returns: (H, W) uint8 mask.
        """
        data = np.asarray(output, dtype=np.float32)
        if data.ndim != 2:
            raise ValueError(f"expected an (h, w) saliency map, got shape {data.shape}")
        lo, hi = data.min(), data.max()
        if not hi > lo:  # constant map (or NaN): ModelScope would divide 0 by 0
            norm = np.zeros(data.shape, dtype=np.uint8)
        else:
            # same float32 operations, in the same order, as ModelScope's torch → numpy code
            norm = (((data - lo) / (hi - lo)) * np.float32(255)).astype(np.uint8)
        height, width = int(size[0]), int(size[1])
        return cv2.resize(norm, (width, height), interpolation=cv2.INTER_LINEAR)


def _describe(image: object) -> str:
    if isinstance(image, np.ndarray):
        return f"{image.shape} {image.dtype}"
    return f"a {getattr(image, 'mode', '')} {type(image).__name__}"
