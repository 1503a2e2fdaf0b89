"""The MTTR predictor: windows of frames + text queries -> 0/255 masks at the original resolution.

Reproduces ModelScope 1.40.2's ``ReferringVideoObjectSegmentationPipeline`` (preprocess, forward,
postprocess) without its video I/O: frames come in decoded, RGB uint8, and masks go out as uint8
arrays. The video is cut into the pipeline's windows (:func:`plan_windows`), each window is run
once for all queries (:meth:`RVOSPredictor.predict_window`) and later windows overwrite earlier
ones (:func:`owned_frames`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from vbatch.models.base import Predictor, resolve_device
from vbatch.models.checkpoint import file_version, load_checkpoint
from vbatch.models.precision import autocast, check_precision
from vbatch.models.rvos.config import TEXT_DIR, WEIGHTS_FILE, read_config
from vbatch.models.rvos.convert import from_modelscope
from vbatch.models.rvos.model import MTTR
from vbatch.models.rvos.text import load_tokenizer, max_query_tokens, normalize_query, tokenize
from vbatch.models.rvos.transforms import (
    RVOSTransforms,
    frame_masks,
    owned_frames,
    plan_windows,
    preprocess_frames,
    select_trajectory,
)

logger = logging.getLogger(__name__)


class RVOSPredictor(Predictor):
    """MTTR on a device. Use :meth:`predict_video` or, window by window, :meth:`predict_window`."""

    name = "rvos"

    def __init__(
        self,
        model: MTTR,
        tokenizer,
        device: torch.device,
        model_version: str,
        precision: str = "fp32",
    ) -> None:
        check_precision(precision, device)
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device
        self.model_version = model_version
        self.transforms = RVOSTransforms()
        self.precision = precision

    def forward(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError(
            "rvos segments videos, not images: use predict_video(frames, queries), or "
            "plan_windows() + predict_window(frames_window, queries) to stream a video window by window"
        )

    def predict(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        return self.forward(images)

    @torch.inference_mode()
    def run_network(self, clip: torch.Tensor, queries: Sequence[str]) -> dict[str, torch.Tensor]:
        """The raw network on one preprocessed window.

        Args:
            clip: (T, 3, h, w) float, from :func:`preprocess_frames`.
            queries: text queries, normalised here (lower case, whitespace collapsed).

        Returns: ``pred_masks`` (T, B, Nq, h/4, w/4) and ``pred_is_referred`` (T, B, Nq, 2), float32.
        """
        ids, mask = tokenize(
            self.tokenizer,
            [normalize_query(q) for q in queries],
            max_query_tokens(self.model.cfg.text),
        )
        with autocast(self.precision, self.device):
            out = self.model(clip.to(self.device), ids.to(self.device), mask.to(self.device))
        return {k: v.float() for k, v in out.items()}

    @torch.inference_mode()
    def predict_window(self, frames: np.ndarray, queries: Sequence[str]) -> np.ndarray:
        """Masks of one window for every query, in ONE forward (the backbone runs once for all queries).

        Args:
            frames: (T, H, W, 3) uint8 RGB, one window (T <= 24 in the pipeline's plan).
            queries: B text queries.

        Returns: (B, T, H, W) uint8, 0 or 255. The query slot is chosen per window.
        """
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be (T, H, W, 3), got {frames.shape}")
        t, h, w = frames.shape[:3]
        if not queries or t == 0:
            return np.zeros((len(queries), t, h, w), np.uint8)
        # resized on the CPU like the reference pipeline (its video tensor is on the CPU), then moved
        clip = preprocess_frames(frames)
        out = self.run_network(clip, queries)
        logits, _ = select_trajectory(out["pred_is_referred"], out["pred_masks"])
        return frame_masks(logits, (clip.shape[-2], clip.shape[-1]), (h, w)).cpu().numpy()

    def predict_video(self, frames: np.ndarray, queries: Sequence[str]) -> np.ndarray:
        """The whole pipeline on a decoded video.

        Args:
            frames: (T, H, W, 3) uint8 RGB.
            queries: text queries (any number; the reference pipeline accepts 1 or 2).

        Returns: (len(queries), T, H, W) uint8 masks, 0 or 255.
        """
        frames = np.asarray(frames)
        t, h, w = frames.shape[:3]
        out = np.zeros((len(queries), t, h, w), np.uint8)
        windows = plan_windows(t)
        for (start, stop), (own_start, own_stop) in zip(
            windows, owned_frames(windows), strict=True
        ):
            masks = self.predict_window(frames[start:stop], queries)
            out[:, own_start:own_stop] = masks[:, own_start - start : own_stop - start]
        return out


def load_transforms(model_dir: Path) -> RVOSTransforms:
    """Per-frame pre/post-processing (no weights; MTTR's transforms need no configuration)."""
    return RVOSTransforms()


def load(
    model_dir: Path, device: str | torch.device | None = None, *, precision: str = "fp32"
) -> RVOSPredictor:
    """Build MTTR from a ModelScope model directory, strictly.

    Args:
        model_dir: ``configuration.json``, ``pytorch_model.pt``, ``transformer_cfg_dir/``.
        device: ``"cpu"``, ``"cuda"``, ... or ``None`` for the best available.
        precision: ``"fp32"`` (default, the reference's), ``"bf16"`` or ``"fp16"`` (autocast; fp16
            needs CUDA).

    Returns:
        An :class:`RVOSPredictor`.
    """
    dev = resolve_device(device)
    check_precision(precision, dev)
    model_dir = Path(model_dir)
    cfg = read_config(model_dir)
    ckpt = model_dir / WEIGHTS_FILE
    model = MTTR(cfg)
    load_checkpoint(model, ckpt, from_modelscope)
    tokenizer = load_tokenizer(model_dir / TEXT_DIR)
    return RVOSPredictor(model, tokenizer, dev, file_version(ckpt), precision)
