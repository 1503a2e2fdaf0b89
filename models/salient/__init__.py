"""Salient-object detection (ModelScope ``damo/cv_res2net_salient-detection``): builder and predictor.

A ModelScope model directory holds ``pytorch_model.pt`` (a raw state dict) and, for SENet, a
``config.py`` with ``norm_mean``, ``norm_std`` and ``norm_size``; without ``config.py`` ModelScope
builds U2NET with ImageNet normalisation at 320×320, and so do we (``config.py`` is read as data,
never executed). See ``model.py`` (SENet), ``u2net.py`` (U²-Net), ``convert.py`` (checkpoint keys)
and ``transforms.py`` (resize in, mask out). Reference: ModelScope 1.40.2
``models/cv/salient_detection/salient_model.py`` and ``pipelines/cv/image_salient_detection_pipeline.py``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vbatch.models.base import Predictor, Transforms, resolve_device
from vbatch.models.checkpoint import file_version, load_checkpoint
from vbatch.models.salient.config import (
    DEFAULT_MEAN,
    DEFAULT_SIZE,
    DEFAULT_STD,
    SENET,
    U2NET,
    WEIGHTS_FILE,
    SalientConfigError,
    SalientWeights,
    SENetConfig,
    U2NetConfig,
    Variant,
    read_model_dir,
    write_config_py,
)
from vbatch.models.salient.convert import (
    convert_senet,
    convert_u2net,
    senet_to_modelscope,
    senet_unused_keys,
)
from vbatch.models.salient.model import SENet
from vbatch.models.salient.transforms import SalientTransforms
from vbatch.models.salient.u2net import U2Net

__all__ = [
    "SalientConfigError",
    "SalientPredictor",
    "SalientTransforms",
    "SalientWeights",
    "build_network",
    "load",
    "load_transforms",
    "write_random_model_dir",
]

logger = logging.getLogger(__name__)

_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_network(variant: Variant, cfg: SENetConfig | U2NetConfig | None = None) -> nn.Module:
    """The bare network of ``variant`` (random weights); ``cfg`` defaults to the real preset."""
    if variant == "senet":
        return SENet(cfg if isinstance(cfg, SENetConfig) else SENET)
    if variant == "u2net":
        return U2Net(cfg if isinstance(cfg, U2NetConfig) else U2NET)
    raise ValueError(f"unknown salient variant {variant!r} (senet or u2net)")


def _check_size(weights: SalientWeights, net: nn.Module, source: Path) -> None:
    m = getattr(net, "size_multiple", 1)
    if any(s % m for s in weights.norm_size):
        raise SalientConfigError(
            f"{source}: norm_size {weights.norm_size} must be multiples of {m} for {type(net).__name__}"
        )


def load_transforms(model_dir: Path) -> Transforms:
    """The CPU transforms of a model directory (reads ``config.py`` only, no weights)."""
    return SalientTransforms(read_model_dir(Path(model_dir)).norm_size)


class SalientPredictor(Predictor):
    """The network on its device; normalisation runs there, on the uint8 input."""

    name = "salient"

    def __init__(
        self,
        net: nn.Module,
        weights: SalientWeights,
        model_version: str,
        device: torch.device,
        precision: str = "fp32",
        weights_path: Path | None = None,
    ) -> None:
        if precision not in _PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(_PRECISIONS)}, got {precision!r}")
        self.device = device
        self.net = net.to(device).eval()
        self.weights = weights
        self.variant = weights.variant
        self.model_version = model_version
        self.weights_path = weights_path
        self.transforms = SalientTransforms(weights.norm_size)
        self.precision = precision
        self._mean = torch.tensor(weights.norm_mean, dtype=torch.float32, device=device).view(
            1, 3, 1, 1
        )
        self._std = torch.tensor(weights.norm_std, dtype=torch.float32, device=device).view(
            1, 3, 1, 1
        )

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """torchvision's ``ToTensor`` + ``Normalize``: (B, h, w, 3) uint8 → (B, 3, h, w) float32."""
        # contiguous NCHW: a channels-last input would make the convolutions pick other kernels,
        # which moves the maps by up to 1e-3 from the reference's
        x = images.permute(0, 3, 1, 2).to(torch.float32).contiguous().div(255)
        return x.sub(self._mean).div(self._std)

    def forward(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Args: inputs: preprocessed (h, w, 3) uint8 images, all of ``norm_size``.

        Returns: one (h, w) float32 saliency map in [0, 1] per input (the network's first output).
        """
        if not inputs:
            return []
        batch = torch.from_numpy(np.stack(inputs))
        with torch.inference_mode():
            x = self.normalize(batch.to(self.device, non_blocking=True))
            if self.precision == "fp32":
                maps = self.net(x)
            else:
                with torch.autocast(self.device.type, dtype=_PRECISIONS[self.precision]):
                    maps = self.net(x)
            out = maps[:, 0].float().cpu().numpy()
        return list(out)


def load(
    model_dir: Path, device: str | torch.device | None = None, **options: Any
) -> SalientPredictor:
    """Build the salient predictor of a ModelScope model directory, strictly.

    Args:
        model_dir: holds ``pytorch_model.pt`` and, for SENet, ``config.py``.
        device: ``"cpu"``, ``"cuda"``, … or ``None`` for the best available.
        options: ``precision`` — ``"fp32"`` (default, what parity is proven at), ``"fp16"``, ``"bf16"``.

    Returns:
        A :class:`SalientPredictor`; ``predict(images)`` gives (H, W) uint8 masks.
    """
    unknown = set(options) - {"precision"}
    if unknown:
        raise TypeError(f"salient.load: unknown options {sorted(unknown)} (known: precision)")
    model_dir = Path(model_dir)
    weights = read_model_dir(model_dir)
    net = build_network(weights.variant)
    _check_size(weights, net, model_dir)
    path = model_dir / WEIGHTS_FILE
    convert = partial(convert_senet, model=net) if isinstance(net, SENet) else convert_u2net
    load_checkpoint(net, path, convert)
    version = file_version(path)
    logger.info("loaded salient %s from %s (version %s)", weights.variant, model_dir, version)
    return SalientPredictor(
        net, weights, version, resolve_device(device), weights_path=path, **options
    )


# ---------------------------------------------------------------------------------------------
# Random model directories (tests, `vbatch demo`)


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
    variant: Variant = "senet",
    norm_size: tuple[int, int] = DEFAULT_SIZE,
    seed: int = 0,
) -> Path:
    """Write a model directory in ModelScope's exact layout, with random weights (our code only).

    Args:
        path: the directory to create (may exist).
        variant: ``"senet"`` (writes ``config.py``) or ``"u2net"`` (no ``config.py``; ModelScope then
            uses 320×320, so ``norm_size`` must be that).
        norm_size: (height, width) written to ``config.py``; small sizes (64×64) make fast tests.
        seed: RNG seed.

    Returns:
        ``path``, holding ``pytorch_model.pt`` (ModelScope key names), ``configuration.json`` and,
        for SENet, ``config.py``.
    """
    path = Path(path)
    norm_size = (int(norm_size[0]), int(norm_size[1]))
    if variant == "u2net" and norm_size != DEFAULT_SIZE:
        raise ValueError(
            f"a U2NET model directory has no config.py: its input size is {DEFAULT_SIZE}"
        )
    net = build_network(variant)
    weights = SalientWeights(variant, DEFAULT_MEAN, DEFAULT_STD, norm_size)
    _check_size(weights, net, path)
    # BN statistics barely depend on the input size (randomize_ keeps them robust); cap it for speed
    calib = (min(norm_size[0], 96), min(norm_size[1], 96))
    randomize_(net, seed=seed, calib_size=calib)
    sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
    path.mkdir(parents=True, exist_ok=True)
    if isinstance(net, SENet):
        unused = _random_tensors(senet_unused_keys(net), seed + 1)
        sd = senet_to_modelscope(sd, net, unused)
        write_config_py(path / "config.py", weights)
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
