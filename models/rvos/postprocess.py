"""Windowing and Ref-YouTube-VOS postprocessing of MTTR, as ModelScope's pipeline uses them.

Follows ModelScope 1.40.2: ``pipelines/cv/referring_video_object_segmentation_pipeline.py``
(windows of 24 frames starting every 18 frames, the last ones possibly shorter; a later window
overwrites the frames it shares with an earlier one) and ``utils/postprocessing.py``'s
``ReferYoutubeVOSPostProcess``: per window and query, the query slot with the highest
"is referred" probability averaged over the window's frames is chosen (so the tracked object can
change from one window to the next); its mask logits are upsampled bilinearly to the network's
input size, thresholded with ``sigmoid > 0.5`` and resized to the original frame size by nearest
neighbour.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vbatch.models.rvos.config import OVERLAP, WINDOW


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
