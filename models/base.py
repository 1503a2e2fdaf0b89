"""The contract every vbatch model follows.

A model is split the way the pipeline runs it (Ray's batch-inference examples, SAM's
``ResizeLongestSide`` + ``Sam.preprocess``):

* :class:`Transforms` — CPU work that needs the model directory's configuration but no weights:
  ``preprocess`` (one RGB uint8 image → one fixed-size model input) and ``postprocess`` (one raw
  network output → the product: a mask at the original size, an embedding, …). The pipeline runs
  these in CPU tasks so they overlap with inference.
* :class:`Predictor` — the network on its device: ``forward`` takes a list of preprocessed inputs and
  returns one raw output per input. The pipeline runs it in a GPU actor.

``Predictor.predict`` chains the three for the Python API: ``load_model(...).predict(images)``.
"""

from __future__ import annotations

import dataclasses
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import numpy as np
    import torch

_C = TypeVar("_C")


class CheckpointError(RuntimeError):
    """A checkpoint does not fit the network it is loaded into, or cannot be read.

    (Here, not in :mod:`vbatch.models.checkpoint`, which re-exports it: configs raise it while
    reading a model directory, and they must not import torch.)
    """


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` → the first CUDA device when there is one, else the CPU."""
    import torch  # here, not at the top: the CPU stages import this module for Transforms

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def config_to_json(config: Any) -> str:
    """A flat frozen config dataclass as JSON (vbatch's side file for non-released presets)."""
    return json.dumps(dataclasses.asdict(config), indent=1)


def config_from_json(cls: type[_C], text: str, source: str) -> _C:
    """Parse :func:`config_to_json` output back into ``cls`` (data only).

    Args:
        cls: a flat dataclass whose fields are scalars or tuples (JSON lists become tuples).
        text: the JSON text.
        source: the file name, for error messages.

    Returns:
        The config; fields the file omits keep their defaults.

    Raises:
        ValueError: not a JSON object, or a field ``cls`` does not have.
    """
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"{source}: unknown {cls.__name__} fields {unknown}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


class Transforms(ABC):
    """CPU pre/post-processing of one model (no weights)."""

    @abstractmethod
    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """Args: image: (H, W, 3) uint8 RGB. Returns: one network input (model-specific, fixed shape)."""

    @abstractmethod
    def postprocess(self, output: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """Args: output: one raw network output; size: (height, width) of the original image."""


class Predictor(ABC):
    """A loaded network on a device, with its transforms."""

    #: registry name, e.g. ``"salient"``
    name: str
    #: short hash of the checkpoint file, written to every result row
    model_version: str
    transforms: Transforms
    device: torch.device

    @abstractmethod
    def forward(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Run the network on a batch of preprocessed inputs; one raw output per input (numpy, CPU)."""

    def predict(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """End to end for a batch of RGB uint8 images (H, W, 3); one product per image."""
        if not images:
            return []
        inputs = [self.transforms.preprocess(im) for im in images]
        outputs = self.forward(inputs)
        return [
            self.transforms.postprocess(o, im.shape[:2])
            for o, im in zip(outputs, images, strict=True)
        ]
