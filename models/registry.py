"""The explicit model registry and the one public entry point, :func:`load_model`.

Model packages are imported lazily, on first use: no import-time side effects, and a worker that
runs ``salient`` never imports the video stack.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from vbatch.models.base import Predictor, Transforms


@dataclass(frozen=True)
class ModelEntry:
    """Where a model lives and what it produces."""

    module: str
    #: what the pipeline writes for it: "mask" (8-bit PNG), "embedding" (float vector), "rgba" (matte)
    output: str
    modelscope_id: str
    summary: str
    #: the job options ``load()`` accepts, by name (``threads`` is the actor's share of the cores;
    #: the others are fields of the job's configuration); the jobs pass exactly these
    options: tuple[str, ...] = ()
    #: the job options ``load_transforms()`` accepts, by name
    transform_options: tuple[str, ...] = ()


REGISTRY: dict[str, ModelEntry] = {
    "salient": ModelEntry(
        "vbatch.models.salient",
        "mask",
        "damo/cv_res2net_salient-detection",
        "salient-object detection (Res2Net/SENet with edge guidance, or U2NET)",
    ),
    "shop-seg": ModelEntry(
        "vbatch.models.shop_seg",
        "mask",
        "damo/cv_vitb16_segmentation_shop-seg",
        "product segmentation (DenseCLIP, CLIP ViT-B/16 at 1024²)",
        options=("precision",),
    ),
    "matting": ModelEntry(
        "vbatch.models.matting",
        "rgba",
        "damo/cv_unet_image-matting",
        "portrait matting (ModelScope's TensorFlow graph, run by ONNX Runtime)",
        # ONNX Runtime has its own thread pool: it gets the actor's share of the cores
        options=("threads", "max_side"),
        transform_options=("max_side",),
    ),
    "reid": ModelEntry(
        "vbatch.models.reid",
        "embedding",
        "damo/cv_passvitb_image-reid-person_market",
        "person re-ID embeddings (PASS ViT-B/16, 1536-d)",
    ),
    "rvos": ModelEntry(
        "vbatch.models.rvos",
        "video-masks",
        "damo/cv_swin-t_referring_video-object-segmentation",
        "referring video object segmentation (MTTR, video Swin-T + RoBERTa)",
        options=("precision",),
    ),
}


class UnknownModelError(KeyError):
    def __str__(self) -> str:
        return f"unknown model {self.args[0]!r}; known: {', '.join(sorted(REGISTRY))}"


def model_entry(name: str) -> ModelEntry:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownModelError(name) from None


def _package(name: str) -> ModuleType:
    return importlib.import_module(model_entry(name).module)


def load_model(
    name: str, model_dir: str | Path, device: str | torch.device | None = None, **options: Any
) -> Predictor:
    """Build model ``name`` from a local ModelScope model directory, strictly.

    Args:
        name: a key of :data:`REGISTRY`.
        model_dir: local folder in ModelScope's layout (remote URIs: ``operators.storage.localize_dir``).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, or ``None`` for the best available.
        options: model-specific options (e.g. ``precision``).

    Returns:
        A :class:`Predictor`; ``predict(list of RGB uint8 arrays)`` gives one product per image.
    """
    return _package(name).load(Path(model_dir), device=device, **options)


def load_transforms(name: str, model_dir: str | Path, **options: Any) -> Transforms:
    """The CPU pre/post-processing of ``name``, from the model directory's config only (no weights).

    ``options`` are the model's transform options (e.g. matting's ``max_side``), the same values
    given to :func:`load`.
    """
    return _package(name).load_transforms(Path(model_dir), **options)
