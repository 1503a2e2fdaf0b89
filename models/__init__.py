"""vbatch models: ModelScope models re-implemented in plain PyTorch, loading ModelScope's layout.

Public API: :func:`load_model`, :func:`load_transforms`, :data:`REGISTRY`.
"""

from vbatch.models.base import Predictor, Transforms
from vbatch.models.checkpoint import CheckpointError
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
