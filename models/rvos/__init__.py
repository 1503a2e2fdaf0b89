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

Files follow ``models/README.md``; ``model.py`` (MTTR) is assembled from ``swin.py`` (video Swin),
``text.py`` (RoBERTa, tokenizer), ``transformer.py`` (multimodal transformer) and ``decoder.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vbatch.models.lazy import lazy_exports

if TYPE_CHECKING:
    from vbatch.models.rvos.config import FULL, TINY, RVOSConfig, read_config
    from vbatch.models.rvos.predictor import RVOSPredictor, load, load_transforms
    from vbatch.models.rvos.text import normalize_query
    from vbatch.models.rvos.transforms import RVOSTransforms, owned_frames, plan_windows

# imported on first use: the CPU stages import the transforms only (no torch), see models/lazy.py
__getattr__ = lazy_exports(
    __name__,
    {
        "vbatch.models.rvos.config": ("FULL", "TINY", "RVOSConfig", "read_config"),
        "vbatch.models.rvos.predictor": ("RVOSPredictor", "load", "load_transforms"),
        "vbatch.models.rvos.text": ("normalize_query",),
        "vbatch.models.rvos.transforms": ("RVOSTransforms", "owned_frames", "plan_windows"),
    },
)

__all__ = [
    "FULL",
    "TINY",
    "RVOSConfig",
    "RVOSPredictor",
    "RVOSTransforms",
    "load",
    "load_transforms",
    "normalize_query",
    "owned_frames",
    "plan_windows",
    "read_config",
]
