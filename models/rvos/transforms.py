"""MTTR pre- and postprocessing as ModelScope's pipeline applies them (CPU or device, no weights).

Follows ``pipelines/cv/referring_video_object_segmentation_pipeline.py`` (ModelScope 1.40.2).
Preprocessing: frames are resized with torchvision's tensor ``resize(size=360, max_size=640)``
(bilinear, antialiased, on uint8), scaled to [0, 1] and normalised with ImageNet's mean/std. Resizing
the frames one by one gives the same values as resizing the clip at once.

Windowing and postprocessing: windows of 24 frames starting every 18 frames, the last ones possibly
shorter; a later window overwrites the frames it shares with an earlier one. ``utils/postprocessing.py``'s
``ReferYoutubeVOSPostProcess``: per window and query, the query slot with the highest "is referred"
probability averaged over the window's frames is chosen (so the tracked object can change from one
window to the next); its mask logits are upsampled bilinearly to the network's input size,
thresholded with ``sigmoid > 0.5`` and resized to the original frame size by nearest neighbour.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from vbatch.models.base import Transforms
from vbatch.models.rvos.config import MAX_SIDE, MEAN, OVERLAP, SHORT_SIDE, STD, WINDOW

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


def plan_windows(
    num_frames: int, window: int = WINDOW, stride: int = WINDOW - OVERLAP
) -> list[tuple[int, int]]:
    """The pipeline's windows: ``[start, min(start + window, num_frames))`` for start = 0, stride, ...

    Starts run up to ``num_frames`` (Python ``range(0, num_frames, stride)``), so a video whose length
    is a multiple of ``window`` still gets a last, short window made only of overlap frames.
    """
    if num_frames < 0 or window <= 0 or stride <= 0:
        raise ValueError(
            f"bad window plan: num_frames={num_frames}, window={window}, stride={stride}"
        )
    return [(s, min(s + window, num_frames)) for s in range(0, num_frames, stride)]


def owned_frames(windows: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The overwrite rule: the frames whose final masks come from each window.

    A later window overwrites every frame it shares with earlier ones, so window k decides frames
    ``[start_k, start_{k+1})`` (the last window: all its frames). A streaming caller can emit those
    frames as soon as window k is done. Windows must be in order, as :func:`plan_windows` gives them.
    """
    out = []
    for k, (start, stop) in enumerate(windows):
        end = windows[k + 1][0] if k + 1 < len(windows) else stop
        out.append((start, min(end, stop)))
    return out


def select_trajectory(
    pred_is_referred: torch.Tensor, pred_masks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose one query slot per query for the whole window.

    Args:
        pred_is_referred: (T, B, Nq, 2) logits; pred_masks: (T, B, Nq, h, w) logits.

    Returns:
        masks: (B, T, h, w) logits of the chosen slots; slots: (B,) int64, the chosen slot indices.
    """
    scores = F.softmax(pred_is_referred, dim=-1)[..., 0].mean(dim=0)  # (B, Nq)
    slots = scores.argmax(dim=-1)
    b = torch.arange(pred_masks.shape[1], device=pred_masks.device)
    return pred_masks.transpose(0, 1)[b, :, slots], slots


def frame_masks(
    logits: torch.Tensor, input_size: tuple[int, int], size: tuple[int, int]
) -> torch.Tensor:
    """Mask logits -> final masks.

    Args:
        logits: (B, T, h, w) mask logits at stride 4 of the network input.
        input_size: (height, width) of the network input (the resized frame).
        size: (height, width) of the original frame.

    Returns: (B, T, H, W) uint8, 0 or 255.
    """
    x = F.interpolate(logits, size=tuple(input_size), mode="bilinear", align_corners=False)
    x = (x.sigmoid() > 0.5).float()
    x = F.interpolate(x, size=tuple(size), mode="nearest")
    return x.to(torch.uint8).mul_(255)


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
