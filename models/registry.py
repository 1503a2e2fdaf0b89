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
from vbatch.models.checkpoint import CheckpointError, file_version, peek_state_dict


@dataclass(frozen=True)
class ModelEntry:
    """Where a model lives and what it produces."""

    module: str
    #: what the pipeline writes for it: "mask" (8-bit PNG), "embedding" (float vector), "rgba" (matte)
    output: str
    modelscope_id: str
    summary: str
    #: files ModelScope's layout must hold, checked on the driver before any worker starts
    required_files: tuple[str, ...] = ()
    #: the ``torch.save`` state dict among them, opened (not loaded) on the driver
    checkpoint: str | None = None
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
        required_files=("pytorch_model.pt",),
        checkpoint="pytorch_model.pt",
        options=("precision",),
    ),
    "shop-seg": ModelEntry(
        "vbatch.models.shop_seg",
        "mask",
        "damo/cv_vitb16_segmentation_shop-seg",
        "product segmentation (DenseCLIP, CLIP ViT-B/16 at 1024²)",
        required_files=(
            "pytorch_model.bin",
            "bpe_simple_vocab_16e6.txt.gz",
        ),
        checkpoint="pytorch_model.bin",
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
        required_files=("pytorch_model.pt",),
        checkpoint="pytorch_model.pt",
        options=("precision",),
    ),
    "rvos": ModelEntry(
        "vbatch.models.rvos",
        "video-masks",
        "damo/cv_swin-t_referring_video-object-segmentation",
        "referring video object segmentation (MTTR, video Swin-T + RoBERTa)",
        required_files=(
            "pytorch_model.pt",
            "configuration.json",
        ),
        checkpoint="pytorch_model.pt",
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


def model_version(name: str, model_dir: str | Path) -> str:
    """The ``model_version`` the model's predictor records in every result row (a short content
    hash of its weights file), computed without loading the model."""
    entry = model_entry(name)
    if entry.checkpoint is not None:
        return file_version(Path(model_dir) / entry.checkpoint)
    if name == "matting":  # the ONNX file, or the graph it was converted from
        from vbatch.models.matting.model import resolve_onnx

        return resolve_onnx(Path(model_dir))[1]
    raise ValueError(f"{name}: no weights file to take a version from")


def check_model_dir(name: str, model_dir: str | Path) -> None:
    """Fail fast, on the driver, when ``model_dir`` cannot be model ``name``'s directory.

    Checks that the files of ModelScope's layout are there and that the checkpoint opens as a
    ``torch.save`` archive (memory-mapped: its tensors are not read). Whether every key and shape
    fits is the strict loader's job, in each actor.

    Raises:
        CheckpointError: naming the directory, the missing file or the unreadable checkpoint.
    """
    entry = model_entry(name)
    model_dir = Path(model_dir)
    missing = [f for f in entry.required_files if not (model_dir / f).is_file()]
    if missing:
        present = sorted(p.name for p in model_dir.iterdir()) if model_dir.is_dir() else []
        raise CheckpointError(
            f"{model_dir} is not a {name} model directory ({entry.modelscope_id}): missing "
            f"{', '.join(missing)}; it holds {', '.join(present) if present else 'nothing'}"
        )
    if entry.checkpoint is not None:
        peek_state_dict(model_dir / entry.checkpoint)


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
        options: passed to the package's ``load`` as keywords (e.g. ``precision``); each package
            declares its own, and an unknown one raises ``TypeError`` naming it.

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
