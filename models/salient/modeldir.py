"""Random-weight salient model directories in ModelScope's layout (tests, ``vbatch demo``).

Written with vbatch's code only; :func:`vbatch.models.salient.load` never imports this module.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from vbatch.models.base import config_to_json
from vbatch.models.salient.config import (
    ARCH_FILE,
    DEFAULT_MEAN,
    DEFAULT_SIZE,
    DEFAULT_STD,
    SENET,
    U2NET,
    WEIGHTS_FILE,
    SalientWeights,
    SENetConfig,
    U2NetConfig,
    Variant,
)
from vbatch.models.salient.convert import senet_to_modelscope, senet_unused_keys
from vbatch.models.salient.model import SENet, build_network, check_input_size

logger = logging.getLogger(__name__)


def write_config_py(path: Path, weights: SalientWeights) -> None:
    """Write ``config.py`` the way a ModelScope SENet directory holds it (literal assignments)."""
    h, w = weights.norm_size
    Path(path).write_text(
        f"norm_mean = {list(weights.norm_mean)!r}\n"
        f"norm_std = {list(weights.norm_std)!r}\n"
        f"norm_size = {[h, w]!r}\n",
        encoding="utf-8",
    )


def _calibration_images(gen: torch.Generator, n: int, size: tuple[int, int]) -> torch.Tensor:
    """(n, 3, h, w) normalised, photo-like images: smooth random fields, the second half with sharp
    edges (blocks), all with mild pixel noise."""
    h, w = size
    coarse = torch.randn(n, 3, max(2, h // 16), max(2, w // 16), generator=gen)
    smooth = nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    blocks = nn.functional.interpolate(coarse, size=(h, w), mode="nearest")
    x = torch.where((torch.arange(n) >= n // 2).view(n, 1, 1, 1), blocks, smooth)
    return x + 0.1 * torch.randn(n, 3, h, w, generator=gen)


@torch.no_grad()
def randomize_(net: nn.Module, seed: int = 0, calib_size: tuple[int, int] = (64, 64)) -> nn.Module:
    """Give every parameter and buffer random values that keep activations and sigmoids unsaturated.

    Convolutions get N(0, 1/fan_in) weights and small random biases, BatchNorm random affine
    parameters; BN running statistics are then set to the batch statistics of one batch of random
    images (train mode, a single batch, so that eval mode reproduces train mode on it) and slightly
    perturbed, which keeps eval-mode activations near unit scale.

    Args:
        net: the network (modified in place).
        seed: RNG seed (the result is deterministic for a given seed and network).
        calib_size: (h, w) of the calibration images.

    Returns:
        ``net``, in eval mode.
    """
    gen = torch.Generator().manual_seed(seed)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / fan_in**0.5)
            if m.bias is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.copy_(0.8 + 0.4 * torch.rand(m.weight.shape, generator=gen))
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # with one batch: running stats = that batch's statistics
    calib = _calibration_images(gen, 8, calib_size)
    net.train()
    net(calib)
    net.eval()
    for m, mom in zip(bns, momenta, strict=True):
        m.momentum = mom
        assert m.running_mean is not None and m.running_var is not None
        assert m.num_batches_tracked is not None
        std = m.running_var.clamp(min=1e-4).sqrt()
        m.running_mean.add_(0.05 * std * torch.randn(m.running_mean.shape, generator=gen))
        # 1.3-1.5× the measured std: a slight contraction at every BN keeps the activations of
        # images unlike the calibration batch from growing layer after layer
        m.running_var.copy_((std * (1.3 + 0.2 * torch.rand(std.shape, generator=gen))) ** 2)
        m.num_batches_tracked.fill_(int(torch.randint(1, 100_000, (), generator=gen)))
    # centre the output logits and give them std 1.5: sigmoids well inside (0, 1)
    head = net.out_conv_4 if isinstance(net, SENet) else getattr(net, "outconv", None)
    if isinstance(head, nn.Conv2d) and head.bias is not None:
        seen: list[torch.Tensor] = []
        handle = head.register_forward_hook(lambda _m, _i, out: seen.append(out))
        net(calib)
        handle.remove()
        mean, std = seen[0].mean(), seen[0].std().clamp(min=1e-6)
        head.weight.mul_(1.5 / std)
        head.bias.sub_(mean).mul_(1.5 / std)
    return net


def _random_tensors(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Random values for checkpoint entries no module holds, by the kind of buffer their name says."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for k, shape in shapes.items():
        if k.endswith("num_batches_tracked"):
            out[k] = torch.randint(1, 100_000, shape, generator=gen)
        elif k.endswith("running_var"):
            out[k] = 0.5 + torch.rand(shape, generator=gen)
        else:
            out[k] = 0.1 * torch.randn(shape, generator=gen)
    return out


def write_random_model_dir(
    path: str | Path,
    config: SENetConfig | U2NetConfig = SENET,
    seed: int = 0,
    *,
    norm_size: tuple[int, int] = DEFAULT_SIZE,
) -> Path:
    """Write a model directory in ModelScope's exact layout, with random weights (our code only).

    Args:
        path: the directory to create (may exist).
        config: the architecture, which also picks the variant: a :class:`SENetConfig` (writes
            ``config.py``) or a :class:`U2NetConfig` (no ``config.py``; ModelScope then uses 320×320,
            so ``norm_size`` must be that). Anything but the real preset (e.g. ``SENET_TINY``) is
            recorded in ``vbatch_salient.json``, which ModelScope ignores.
        seed: RNG seed.
        norm_size: (height, width) written to ``config.py``; small sizes (64×64) make fast tests.

    Returns:
        ``path``, holding ``pytorch_model.pt`` (ModelScope key names), ``configuration.json`` and,
        for SENet, ``config.py``.
    """
    path = Path(path)
    variant: Variant = "senet" if isinstance(config, SENetConfig) else "u2net"
    norm_size = (int(norm_size[0]), int(norm_size[1]))
    if variant == "u2net" and norm_size != DEFAULT_SIZE:
        raise ValueError(
            f"a U2NET model directory has no config.py: its input size is {DEFAULT_SIZE}"
        )
    net = build_network(variant, config)
    weights = SalientWeights(variant, DEFAULT_MEAN, DEFAULT_STD, norm_size)
    check_input_size(norm_size, net, path)
    # BN statistics barely depend on the input size (randomize_ keeps them robust); cap it for speed
    calib = (min(norm_size[0], 96), min(norm_size[1], 96))
    randomize_(net, seed=seed, calib_size=calib)
    sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
    path.mkdir(parents=True, exist_ok=True)
    if isinstance(net, SENet):
        unused = _random_tensors(senet_unused_keys(net), seed + 1)
        sd = senet_to_modelscope(sd, net, unused)
        write_config_py(path / "config.py", weights)
    if config not in (SENET, U2NET):
        (path / ARCH_FILE).write_text(config_to_json(config), encoding="utf-8")
    torch.save(sd, path / WEIGHTS_FILE)
    # what ModelScope's hub puts next to the weights; our loader does not read it
    pipeline_type = "res2net-salient-detection" if variant == "senet" else "u2net-salient-detection"
    (path / "configuration.json").write_text(
        json.dumps(
            {
                "framework": "pytorch",
                "task": "semantic-segmentation",
                "model": {"type": "detection"},
                "pipeline": {"type": pipeline_type},
            },
            indent=2,
        ),
        encoding="utf-8",
    )
    logger.info("wrote random salient %s model directory %s", variant, path)
    return path
