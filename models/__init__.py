"""vbatch models: ModelScope models re-implemented in plain PyTorch, loading ModelScope's layout.

Public API: :func:`load_model`, :func:`load_transforms`, :data:`REGISTRY`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vbatch.models.lazy import lazy_exports

if TYPE_CHECKING:
    from vbatch.models.base import CheckpointError, Predictor, Transforms
    from vbatch.models.registry import (
        REGISTRY,
        ModelEntry,
        UnknownModelError,
        check_model_dir,
        load_model,
        load_transforms,
        model_entry,
        model_version,
    )

# Imported on first use: torch comes with them, and processes that only need a light module of
# this package (vbatch.models.fileio, used by the storage layer of every stage and of the index
# code) would otherwise pay ~270 MB of private memory and seconds of import for nothing.
__getattr__ = lazy_exports(
    __name__,
    {
        "vbatch.models.base": ("CheckpointError", "Predictor", "Transforms"),
        "vbatch.models.registry": (
            "REGISTRY",
            "ModelEntry",
            "UnknownModelError",
            "check_model_dir",
            "load_model",
            "load_transforms",
            "model_entry",
            "model_version",
        ),
    },
)


__all__ = [
    "REGISTRY",
    "CheckpointError",
    "ModelEntry",
    "Predictor",
    "Transforms",
    "UnknownModelError",
    "check_model_dir",
    "load_model",
    "load_transforms",
    "model_entry",
    "model_version",
]
