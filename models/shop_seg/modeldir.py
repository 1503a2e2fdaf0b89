"""Random-weight shop-seg model directories in ModelScope's layout (tests, demos, benchmarks).

Written with vbatch's code only; :func:`vbatch.models.shop_seg.load` never imports this module.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import json
import logging
import math
import shutil
from pathlib import Path

import torch
from torch import nn

from vbatch.models.fileio import replace_dir, staging_dir
from vbatch.models.shop_seg.config import FULL, WEIGHTS, ShopSegConfig
from vbatch.models.shop_seg.convert import to_modelscope
from vbatch.models.shop_seg.model import ShopSegNet

logger = logging.getLogger(__name__)


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter and buffer with random values of trained-like magnitude (tests, demos).

    Weights get std 1/sqrt(fan_in) so activations neither vanish nor explode through 12 blocks; norm
    scales are near 1; BatchNorm statistics are random but valid (positive variance).
    """
    g = torch.Generator().manual_seed(seed)

    def randn(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=g)

    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)
    for mod in model.modules():
        for name, p in mod.named_parameters(recurse=False):
            if isinstance(mod, norm_types):
                p.copy_(1 + 0.1 * randn(p) if name == "weight" else 0.05 * randn(p))
            elif name == "bias":
                p.copy_(0.05 * randn(p))
            elif isinstance(mod, nn.Embedding):
                p.copy_(0.5 * randn(p))
            elif name in ("proj",):  # (in, out) matrices used as x @ proj
                p.copy_(randn(p) / math.sqrt(p.shape[0]))
            elif p.dim() >= 2 and name == "weight":
                p.copy_(randn(p) / math.sqrt(p[0].numel()))
            else:  # class/positional embeddings, prompt context, gamma
                p.copy_(0.5 * randn(p))
        if isinstance(mod, nn.BatchNorm2d):
            assert mod.running_mean is not None and mod.running_var is not None
            assert mod.num_batches_tracked is not None
            mod.running_mean.copy_(0.1 * randn(mod.running_mean))
            mod.running_var.copy_(0.5 + torch.rand(mod.running_var.shape, generator=g))
            mod.num_batches_tracked.fill_(int(torch.randint(1, 10_000, (1,), generator=g)))
    return model


def _installed_clip_vocab() -> Path | None:
    """CLIP's vocabulary file shipped in an installed ``clip`` (clip-anytorch) or ``open_clip`` package."""
    for package in ("clip", "open_clip"):
        with contextlib.suppress(ImportError, ValueError):
            spec = importlib.util.find_spec(package)
            for folder in (spec.submodule_search_locations or []) if spec else []:
                path = Path(folder) / WEIGHTS.vocab
                if path.is_file():
                    return path
    return None


def _write_byte_vocab(path: Path) -> None:
    """A valid CLIP vocabulary file without merges: every character is a token (random models only)."""
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("bpe_simple_vocab_16e6.txt#version: 0.2")


def write_random_model_dir(
    path: str | Path,
    config: ShopSegConfig = FULL,
    seed: int = 0,
    vocab_path: str | Path | None = None,
) -> Path:
    """Write a ModelScope-layout shop-seg directory with random weights (tests, demos), with our code only.

    Args:
        path: the directory to create (replaced if it exists).
        config: architecture; for anything but :data:`FULL` a ``vbatch_shop_seg.json`` side file is
            written, since ModelScope's layout hard-codes the architecture.
        seed: weights seed.
        vocab_path: CLIP's ``bpe_simple_vocab_16e6.txt.gz`` to copy. By default the one of an installed
            ``clip``/``open_clip`` package; without one, a merge-free byte-level vocabulary (valid,
            tokenises differently from CLIP's; fine for random weights).

    Returns:
        ``path``.
    """
    path = Path(path)
    model = randomize_(ShopSegNet(config), seed)
    vocab = Path(vocab_path) if vocab_path is not None else _installed_clip_vocab()
    tmp = staging_dir(path)
    try:
        torch.save(to_modelscope(model.state_dict()), tmp / WEIGHTS.checkpoint)
        if vocab is not None:
            shutil.copyfile(vocab, tmp / WEIGHTS.vocab)
        else:
            logger.warning("no CLIP vocabulary installed: writing a byte-level one to %s", path)
            _write_byte_vocab(tmp / WEIGHTS.vocab)
        (tmp / "configuration.json").write_text(
            json.dumps(
                {
                    "framework": "pytorch",
                    "task": "shop-segmentation",
                    "model": {"type": "shop-segmentation"},
                    "pipeline": {"type": "shop-segmentation"},
                },
                indent=4,
            )
        )
        if config != FULL:
            (tmp / WEIGHTS.config_file).write_text(config.to_json())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # the old directory (if any) is deleted only once the new one is in place
    return replace_dir(tmp, path)
