"""rvos: referring video object segmentation with MTTR (video Swin-T + RoBERTa), ModelScope's
``damo/cv_swin-t_referring_video-object-segmentation``.

Botach, Zheltonozhskii and Baskin, "End-to-End Referring Video Object Segmentation with Multimodal
Transformers" (CVPR 2022); reference implementation: ModelScope 1.40.2,
``models/cv/referring_video_object_segmentation`` and
``pipelines/cv/referring_video_object_segmentation_pipeline.py``.

Public API::

    predictor = models.load_model("rvos", model_dir)
    masks = predictor.predict_video(frames, ["a person riding a bike"])  # (Q, T, H, W) uint8 0/255

    # streaming, window by window (what the video job does):
    windows = plan_windows(num_frames)              # [(start, stop)], 24 frames every 18
    for (start, stop), (a, b) in zip(windows, owned_frames(windows)):
        m = predictor.predict_window(frames[start:stop], queries)   # (Q, stop-start, H, W)
        final[:, a:b] = m[:, a - start : b - start]                  # later windows win
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from vbatch.models.base import resolve_device
from vbatch.models.checkpoint import file_version, load_checkpoint
from vbatch.models.rvos.config import CHECKPOINT_FILE, FULL, TEXT_DIR, TINY, RVOSConfig
from vbatch.models.rvos.convert import from_modelscope
from vbatch.models.rvos.modeldir import read_config, write_random_model_dir
from vbatch.models.rvos.postprocess import owned_frames, plan_windows
from vbatch.models.rvos.predictor import RVOSPredictor
from vbatch.models.rvos.text import normalize_query
from vbatch.models.rvos.transforms import RVOSTransforms

logger = logging.getLogger(__name__)

__all__ = [
    "FULL",
    "TINY",
    "RVOSConfig",
    "RVOSPredictor",
    "load",
    "load_transforms",
    "normalize_query",
    "owned_frames",
    "plan_windows",
    "write_random_model_dir",
]


def load(
    model_dir: Path, device: str | torch.device | None = None, **options: Any
) -> RVOSPredictor:
    """Build MTTR from a ModelScope model directory, strictly.

    Args:
        model_dir: ``configuration.json``, ``pytorch_model.pt``, ``transformer_cfg_dir/``.
        device: ``"cpu"``, ``"cuda"``, ... or ``None`` for the best available.
        options: ``precision`` = ``"fp32"`` (default, the reference's) | ``"fp16"`` | ``"bf16"`` (autocast).
    """
    from vbatch.models.rvos.model import MTTR
    from vbatch.models.rvos.text import load_tokenizer

    model_dir = Path(model_dir)
    cfg = read_config(model_dir)
    ckpt = model_dir / CHECKPOINT_FILE
    model = MTTR(cfg)
    load_checkpoint(model, ckpt, from_modelscope)
    tokenizer = load_tokenizer(model_dir / TEXT_DIR)
    return RVOSPredictor(model, tokenizer, resolve_device(device), file_version(ckpt), **options)


def load_transforms(model_dir: Path) -> RVOSTransforms:
    """Per-frame pre/post-processing (no weights; MTTR's transforms need no configuration)."""
    return RVOSTransforms()
