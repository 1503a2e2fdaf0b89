"""Person re-identification embeddings: PASS ViT-B/16 (``damo/cv_passvitb_image-reid-person_market``).

Paper: Zhu et al., "PASS: Part-Aware Self-Supervised Pre-Training for Person Re-Identification",
ECCV 2022. Reference: ModelScope 1.40.2 ``models/cv/image_reid_person`` and
``pipelines/cv/image_reid_person_pipeline.py``.

``load(model_dir).predict(list of RGB uint8 arrays)`` returns one float32 (1536,) embedding per image,
exactly what the ModelScope pipeline returns (not L2-normalised).

A model directory is ModelScope's: ``configuration.json`` (read as data; ``model.cfg`` holds the input
size, mean/std, patch stride, fusion and neck options) and ``pytorch_model.pt`` (loaded strictly).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vbatch.models.base import Predictor, resolve_device
from vbatch.models.checkpoint import file_version, load_checkpoint
from vbatch.models.reid.convert import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    ReidConfigError,
    config_to_modelscope,
    from_modelscope,
    read_config,
    to_modelscope,
)
from vbatch.models.reid.model import FULL, TINY, ReidConfig, ReidNet, ViTCfg
from vbatch.models.reid.transforms import ReidTransforms

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
    "randomize_",
    "write_random_model_dir",
]

logger = logging.getLogger(__name__)

#: length of the released model's embedding: cat(cls, mean of the three part tokens), 2 × 768
EMBED_DIM = FULL.embed_dim

_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class ReidPredictor(Predictor):
    """The PASS network on a device. ``forward`` takes preprocessed (h, w, 3) uint8 crops."""

    name = "reid"

    def __init__(
        self,
        net: ReidNet,
        transforms: ReidTransforms,
        device: torch.device,
        model_version: str,
        precision: str = "fp32",
    ) -> None:
        self.net = net.to(device).eval()
        self.transforms = transforms
        self.device = device
        self.model_version = model_version
        self.precision = precision
        self.embed_dim = net.cfg.embed_dim

    def forward(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Args: inputs: N arrays (h, w, 3) uint8 from :meth:`ReidTransforms.preprocess`.
        Returns: N float32 embeddings (E,)."""
        if len(inputs) == 0:
            return []
        h, w = self.net.cfg.image_size
        for i, x in enumerate(inputs):
            if x.shape != (h, w, 3) or x.dtype != np.uint8:
                raise ValueError(
                    f"input {i}: expected ({h}, {w}, 3) uint8, got {x.dtype} {x.shape}"
                )
        batch = torch.from_numpy(np.stack(inputs)).to(self.device, non_blocking=True)
        dtype = _PRECISIONS[self.precision]
        autocast = (
            torch.autocast(self.device.type, dtype=dtype)
            if dtype is not None
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            out = self.net(batch.permute(0, 3, 1, 2))
        return list(out.float().cpu().numpy())


def load_transforms(model_dir: Path) -> ReidTransforms:
    """The CPU pre/post-processing, from ``configuration.json`` only."""
    cfg = read_config(model_dir)
    return ReidTransforms(cfg.image_size, cfg.embed_dim)


def load(
    model_dir: Path, device: str | torch.device | None = None, **options: Any
) -> ReidPredictor:
    """Build the network from a ModelScope model directory, strictly.

    Args:
        model_dir: folder with ``configuration.json`` and ``pytorch_model.pt``.
        device: ``"cpu"``, ``"cuda"``, … or ``None`` for the best available.
        options: ``precision``: ``"fp32"`` (default, the reference's), ``"bf16"`` or ``"fp16"``
            (autocast; not parity-checked).

    Returns:
        A :class:`ReidPredictor`.

    Raises:
        ReidConfigError: the configuration is missing an option or has one the reference cannot run.
        CheckpointError: the checkpoint does not fit (every missing/unexpected/mis-shaped key listed).
    """
    precision = options.pop("precision", "fp32")
    if options:
        raise TypeError(f"unknown reid options {sorted(options)}; known: ['precision']")
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {list(_PRECISIONS)}, got {precision!r}")
    model_dir = Path(model_dir)
    cfg = read_config(model_dir)
    weights = model_dir / WEIGHTS_FILE
    net = ReidNet(cfg)
    load_checkpoint(net, weights, from_modelscope)
    dev = resolve_device(device)
    logger.info("reid: %s on %s (%s, %d-d embedding)", model_dir, dev, precision, cfg.embed_dim)
    return ReidPredictor(
        net, ReidTransforms(cfg.image_size, cfg.embed_dim), dev, file_version(weights), precision
    )


# ----------------------------------------------------------------------------------------------------
# random model directories (tests, ``vbatch demo``)


@torch.no_grad()
def randomize_(net: ReidNet, generator: torch.Generator) -> ReidNet:
    """Fill every parameter and persistent buffer with random values of sane magnitude (unit-variance
    activations, softmax away from one-hot, BatchNorm statistics away from identity)."""
    for name, t in net.state_dict().items():
        if name.endswith("num_batches_tracked"):
            t.fill_(int(torch.randint(1, 10_000, (), generator=generator)))
        elif name.endswith("running_var"):
            t.copy_(torch.rand(t.shape, generator=generator) + 0.5)
        elif name.endswith("running_mean") or name.endswith("bias"):
            t.copy_(0.1 * torch.randn(t.shape, generator=generator))
        elif name.endswith(("tokens", "token_pos", "pos_embed")):
            t.copy_(0.5 * torch.randn(t.shape, generator=generator))
        elif t.ndim == 1:  # LayerNorm / BatchNorm scale
            t.copy_(1.0 + 0.1 * torch.randn(t.shape, generator=generator))
        else:  # linear / conv weights, fan-in scaled
            t.copy_(torch.randn(t.shape, generator=generator) / math.sqrt(t[0].numel()))
    return net


def write_random_model_dir(path: str | Path, config: ReidConfig = FULL, seed: int = 0) -> Path:
    """Write a model directory in ModelScope's layout with random weights, using vbatch's code only.

    The checkpoint has ModelScope's key names and also carries the training-only keys a trained one
    does (ID classifier, the backbone's ImageNet head), so loading it exercises the converter fully.
    A non-ViT-B ``config`` (e.g. :data:`TINY`) is recorded under ``vbatch_backbone`` in
    ``configuration.json``, which ModelScope ignores.

    Args:
        path: the directory to create (may exist).
        config: :data:`FULL` (ViT-B/16, ~350 MB) or :data:`TINY` (~0.5 MB) or any :class:`ReidConfig`.
        seed: seed of the random weights.

    Returns:
        ``path`` as a :class:`Path`.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    net = randomize_(ReidNet(config), g)
    sd = to_modelscope({k: v.clone() for k, v in net.state_dict().items()})
    dim = config.vit.embed_dim
    sd["classifier.weight"] = 0.01 * torch.randn(config.num_classes, config.embed_dim, generator=g)
    sd["base.fc.weight"] = 0.01 * torch.randn(1000, dim, generator=g)
    sd["base.fc.bias"] = torch.zeros(1000)
    (path / CONFIG_FILE).write_text(
        json.dumps(config_to_modelscope(config), indent=2) + "\n", encoding="utf-8"
    )
    tmp = path / (WEIGHTS_FILE + ".tmp")
    torch.save(sd, tmp)
    tmp.replace(path / WEIGHTS_FILE)
    return path
