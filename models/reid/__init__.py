"""Person re-identification embeddings: PASS ViT-B/16 (``damo/cv_passvitb_image-reid-person_market``).

Paper: Zhu et al., "PASS: Part-Aware Self-Supervised Pre-Training for Person Re-Identification",
ECCV 2022. Reference: ModelScope 1.40.2 ``models/cv/image_reid_person`` and
``pipelines/cv/image_reid_person_pipeline.py``.

A model directory is ModelScope's: ``configuration.json`` (read as data; ``model.cfg`` holds the input
size, mean/std, patch stride, fusion and neck options) and ``pytorch_model.pt`` (loaded strictly).
Files follow ``models/README.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vbatch.models.lazy import lazy_exports

if TYPE_CHECKING:
    from vbatch.models.reid.config import (
        EMBED_DIM,
        FULL,
        TINY,
        ReidConfig,
        ReidConfigError,
        ViTCfg,
        read_config,
    )
    from vbatch.models.reid.model import ReidNet
    from vbatch.models.reid.predictor import ReidPredictor, load, load_transforms
    from vbatch.models.reid.transforms import ReidTransforms

# imported on first use: the CPU stages import the transforms only (no torch), see models/lazy.py
__getattr__ = lazy_exports(
    __name__,
    {
        "vbatch.models.reid.config": (
            "EMBED_DIM",
            "FULL",
            "TINY",
            "ReidConfig",
            "ReidConfigError",
            "ViTCfg",
            "read_config",
        ),
        "vbatch.models.reid.model": ("ReidNet",),
        "vbatch.models.reid.predictor": ("ReidPredictor", "load", "load_transforms"),
        "vbatch.models.reid.transforms": ("ReidTransforms",),
    },
)

__all__ = [
    "EMBED_DIM",
    "FULL",
    "TINY",
    "ReidConfig",
    "ReidConfigError",
    "ReidNet",
    "ReidPredictor",
    "ReidTransforms",
    "ViTCfg",
    "load",
    "load_transforms",
    "read_config",
]
