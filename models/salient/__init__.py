"""Salient-object detection (ModelScope ``damo/cv_res2net_salient-detection``).

A ModelScope model directory holds ``pytorch_model.pt`` (a raw state dict) and, for SENet, a
``config.py`` with ``norm_mean``, ``norm_std`` and ``norm_size``; without ``config.py`` ModelScope
builds U2NET with ImageNet normalisation at 320×320, and so do we (``config.py`` is read as data,
never executed). Files follow ``models/README.md``; ``u2net.py`` holds U²-Net next to SENet's
``model.py``. Reference: ModelScope 1.40.2 ``models/cv/salient_detection/salient_model.py`` and
``pipelines/cv/image_salient_detection_pipeline.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vbatch.models.lazy import lazy_exports

if TYPE_CHECKING:
    from vbatch.models.salient.config import (
        FULL,
        SENET,
        SENET_TINY,
        TINY,
        U2NET,
        U2NET_TINY,
        SalientConfigError,
        SalientWeights,
        SENetConfig,
        U2NetConfig,
        read_config,
        read_model_dir,
    )
    from vbatch.models.salient.model import build_network
    from vbatch.models.salient.predictor import SalientPredictor, load, load_transforms
    from vbatch.models.salient.transforms import SalientTransforms

# imported on first use: the CPU stages import the transforms only (no torch), see models/lazy.py
__getattr__ = lazy_exports(
    __name__,
    {
        "vbatch.models.salient.config": (
            "FULL",
            "SENET",
            "SENET_TINY",
            "TINY",
            "U2NET",
            "U2NET_TINY",
            "SalientConfigError",
            "SalientWeights",
            "SENetConfig",
            "U2NetConfig",
            "read_config",
            "read_model_dir",
        ),
        "vbatch.models.salient.model": ("build_network",),
        "vbatch.models.salient.predictor": ("SalientPredictor", "load", "load_transforms"),
        "vbatch.models.salient.transforms": ("SalientTransforms",),
    },
)

__all__ = [
    "FULL",
    "SENET",
    "SENET_TINY",
    "TINY",
    "U2NET",
    "U2NET_TINY",
    "SENetConfig",
    "SalientConfigError",
    "SalientPredictor",
    "SalientTransforms",
    "SalientWeights",
    "U2NetConfig",
    "build_network",
    "load",
    "load_transforms",
    "read_config",
    "read_model_dir",
]
