"""MTTR preprocessing as ModelScope's pipeline applies it (CPU or device, no weights).

Follows ``pipelines/cv/referring_video_object_segmentation_pipeline.py`` (ModelScope 1.40.2):
frames are resized with torchvision's tensor ``resize(size=360, max_size=640)`` (bilinear,
antialiased, on uint8), scaled to [0, 1] and normalised with ImageNet's mean/std. Resizing the
frames one by one gives the same values as resizing the clip at once.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torchvision.transforms.functional as TF

from vbatch.models.base import Transforms
from vbatch.models.rvos.config import MAX_SIDE, MEAN, SHORT_SIDE, STD
from vbatch.models.rvos.postprocess import frame_masks

logger = logging.getLogger(__name__)


def resized_size(
    size: tuple[int, int], short: int = SHORT_SIDE, max_side: int = MAX_SIDE
) -> tuple[int, int]:
    """(height, width) of a frame after the pipeline's resize: short side ``short``, long side at most
    ``max_side`` (torchvision's rule, integer truncation included)."""
    h, w = size
    lo, hi = min(h, w), max(h, w)
    new_lo, new_hi = short, int(short * hi / lo)
    if new_hi > max_side:
        new_lo, new_hi = int(max_side * new_lo / new_hi), max_side
    return (new_lo, new_hi) if h <= w else (new_hi, new_lo)


def preprocess_frames(
    frames: np.ndarray | torch.Tensor, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Args: frames: (T, H, W, 3) uint8 RGB. Returns: (T, 3, h, w) float32, resized and normalised."""
    x = torch.as_tensor(frames).to(device).permute(0, 3, 1, 2)
    if x.dtype != torch.uint8:
        raise TypeError(f"frames must be uint8, got {x.dtype}")
    x = TF.resize(x, size=SHORT_SIDE, max_size=MAX_SIDE, antialias=True)
    x = x.to(torch.float32).div_(255)
    return TF.normalize(x, mean=list(MEAN), std=list(STD))


class RVOSTransforms(Transforms):
    """Per-frame view of the preprocessing and of the last postprocessing step.

    MTTR's real unit is a window of frames (see ``plan_windows``/``predict_window``); these
    per-frame functions exist for the pipeline's CPU stages: ``preprocess`` resizes and normalises
    one frame; ``postprocess`` turns the chosen query slot's mask logits of one frame into the
    final 0/255 mask at the original size.
    """

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """Args: image: (H, W, 3) uint8 RGB. Returns: (3, h, w) float32 (h, w from :func:`resized_size`)."""
        return preprocess_frames(image[None])[0].numpy()

    def postprocess(self, output: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """Args: output: (ceil(h/4), ceil(w/4)) mask logits of the chosen slot; size: original (H, W).

        Returns: (H, W) uint8, 0 or 255.
        """
        logits = torch.as_tensor(output)[None, None]
        return frame_masks(logits, resized_size(size), size)[0, 0].numpy()
