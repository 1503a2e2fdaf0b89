"""The explicit model registry and the one public entry point, :func:`load_model`.

Model packages are imported lazily, on first use: no import-time side effects, and a worker that
runs ``salient`` never imports the video stack. The registry itself imports no torch (each entry
lives in its package's torch-free ``config.py``), so the CLI can list the models in ``--help``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from vbatch.models.base import CheckpointError
from vbatch.models.entry import ModelEntry
from vbatch.models.matting.config import ENTRY as MATTING
from vbatch.models.reid.config import ENTRY as REID
from vbatch.models.rvos.config import ENTRY as RVOS
from vbatch.models.salient.config import ENTRY as SALIENT
from vbatch.models.shop_seg.config import ENTRY as SHOP_SEG

if TYPE_CHECKING:
    import torch

    from vbatch.models.base import Predictor, Transforms

#: every model, by name: each entry is declared next to its model's config
REGISTRY: dict[str, ModelEntry] = {e.name: e for e in (SALIENT, SHOP_SEG, MATTING, REID, RVOS)}


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
        from vbatch.models.checkpoint import file_version

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
        from vbatch.models.checkpoint import peek_state_dict

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
        Its ``model_version`` (what every result row records) is the weights' content hash,
        with ``+bf16`` / ``+fp16`` appended at a reduced precision.
    """
    predictor: Predictor = _package(name).load(Path(model_dir), device=device, **options)
    precision = options.get("precision", "fp32")
    if precision != "fp32":
        # rows record the precision beside the weights: resume and --reuse never mix them
        predictor.model_version = f"{predictor.model_version}+{precision}"
    return predictor


def weights_version(model_version: str) -> str:
    """The weights' part of a row's ``model_version`` (``"3fa9c1d2e4b5+bf16"`` → its weights
    ``"3fa9c1d2e4b5"``): embeddings of the same weights at another precision are comparable
    (cosine >= 0.999, docs/BENCHMARKS.md), so searches and evaluations compare this part."""
    return model_version.split("+", 1)[0]


def load_transforms(name: str, model_dir: str | Path, **options: Any) -> Transforms:
    """The CPU pre/post-processing of ``name``, from the model directory's config only (no weights).

    ``options`` are the model's transform options (e.g. matting's ``max_side``), the same values
    given to :func:`load`.
    """
    return _package(name).load_transforms(Path(model_dir), **options)
