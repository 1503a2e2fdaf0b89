"""Random-weight re-ID model directories in ModelScope's layout (tests, ``vbatch demo``).

Written with vbatch's code only; :func:`vbatch.models.reid.load` never imports this module.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import torch

from vbatch.models.fileio import atomic_write_bytes
from vbatch.models.reid.config import (
    CONFIG_FILE,
    FULL,
    WEIGHTS_FILE,
    ReidConfig,
    config_to_modelscope,
)
from vbatch.models.reid.convert import to_modelscope
from vbatch.models.reid.model import ReidNet


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
    buf = io.BytesIO()
    torch.save(sd, buf)
    atomic_write_bytes(path / WEIGHTS_FILE, buf.getvalue())
    return path
