"""CPU pre/post-processing of the PASS re-ID model.

Reference: ModelScope 1.40.2 ``pipelines/cv/image_reid_person_pipeline.py``: ``T.Resize(SIZE_TEST)`` on
a PIL image (PIL bilinear with its antialiasing, to exactly (height, width), no aspect preservation),
then ``ToTensor`` + ``Normalize``. The resize is done here on uint8; the normalisation is done by
:meth:`vbatch.models.reid.model.ReidNet.normalize` on the device, so uint8 crosses to the GPU.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from vbatch.models.base import Transforms


class ReidTransforms(Transforms):
    """Resize a person crop to the network's input; the embedding is passed through unchanged."""

    def __init__(self, image_size: tuple[int, int], embed_dim: int) -> None:
        """Args: image_size: (height, width) of the network input; embed_dim: length of the output."""
        self.image_size = image_size
        self.embed_dim = embed_dim

    def preprocess(self, image: np.ndarray | Image.Image) -> np.ndarray:
        """Args: image: (H, W, 3) uint8 RGB, or a Pillow image in mode "RGB" (resized as it is).
        Returns: (h, w, 3) uint8 at the configured size."""
        h, w = self.image_size
        if isinstance(image, Image.Image) and image.mode == "RGB" and min(image.size) > 0:
            return np.asarray(image.resize((w, h), Image.Resampling.BILINEAR), dtype=np.uint8)
        if (
            not isinstance(image, np.ndarray)
            or image.dtype != np.uint8
            or image.ndim != 3
            or image.shape[2] != 3
        ):
            raise ValueError(
                "expected an (H, W, 3) uint8 RGB array, got "
                + (
                    f"{image.dtype} {image.shape}"
                    if isinstance(image, np.ndarray)
                    else type(image).__name__
                )
            )
        if min(image.shape[:2]) == 0:
            raise ValueError(f"empty image {image.shape}")
        resized = Image.fromarray(np.ascontiguousarray(image)).resize(
            (w, h), Image.Resampling.BILINEAR
        )
        return np.asarray(resized, dtype=np.uint8)

    def postprocess(self, output: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """Args: output: (E,) embedding; size: unused. Returns: the same (E,) float32 embedding, not
        L2-normalised (the index job normalises)."""
        if output.shape != (self.embed_dim,):
            raise ValueError(
                f"expected an embedding of shape ({self.embed_dim},), got {output.shape}"
            )
        return np.asarray(output, dtype=np.float32)
