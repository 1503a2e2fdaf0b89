"""The salient predictor and :func:`load`: a ModelScope model directory → the network on a device.

Reference: ModelScope 1.40.2 ``models/cv/salient_detection/salient_model.py`` (``SalientDetection``:
normalise, run, keep the first map) and ``pipelines/cv/image_salient_detection_pipeline.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vbatch.models.base import Predictor, resolve_device
from vbatch.models.checkpoint import file_version, load_checkpoint
from vbatch.models.precision import autocast, check_precision
from vbatch.models.salient.config import (
    WEIGHTS_FILE,
    SalientWeights,
    read_config,
    read_model_dir,
)
from vbatch.models.salient.convert import convert_senet, convert_u2net
from vbatch.models.salient.model import SENet, build_network, check_input_size
from vbatch.models.salient.transforms import SalientTransforms

logger = logging.getLogger(__name__)


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
        check_precision(precision, device)
        self.device = device
        self.precision = precision
        # Reduced precision runs channels-last: oneDNN's bf16 convolutions then skip a layout
        # reorder around every conv (SENet at 320², bf16, 2 threads: 5.0 → 10.5 images/s, fp32 3.2;
        # deviation from fp32 unchanged). fp32 stays NCHW, the reference's kernels (see normalize).
        self.memory_format = torch.contiguous_format if precision == "fp32" else torch.channels_last
        self.net = net.to(device).to(memory_format=self.memory_format).eval()
        self.weights = weights
        self.variant = weights.variant
        self.model_version = model_version
        self.weights_path = weights_path
        self.transforms = SalientTransforms(weights.norm_size)
        self._mean = torch.tensor(weights.norm_mean, dtype=torch.float32, device=device).view(
            1, 3, 1, 1
        )
        self._std = torch.tensor(weights.norm_std, dtype=torch.float32, device=device).view(
            1, 3, 1, 1
        )

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """torchvision's ``ToTensor`` + ``Normalize``: (B, h, w, 3) uint8 → (B, 3, h, w) float32."""
        # fp32: contiguous NCHW, since a channels-last input would make the convolutions pick other
        # kernels, which moves the maps by up to 1e-3 from the reference's; bf16/fp16: channels-last
        x = images.permute(0, 3, 1, 2).to(torch.float32).div(255)
        return x.sub(self._mean).div(self._std).contiguous(memory_format=self.memory_format)

    def forward(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Args: inputs: preprocessed (h, w, 3) uint8 images, all of ``norm_size``.

        Returns: one (h, w) float32 saliency map in [0, 1] per input (the network's first output).
        """
        if not inputs:
            return []
        batch = torch.from_numpy(np.stack(inputs))
        with torch.inference_mode():
            x = self.normalize(batch.to(self.device, non_blocking=True))
            with autocast(self.precision, self.device):
                maps = self.net(x)
            out = maps[:, 0].float().cpu().numpy()
        return list(out)


def load_transforms(model_dir: Path) -> SalientTransforms:
    """The CPU transforms of a model directory (reads ``config.py`` only, no weights)."""
    return SalientTransforms(read_model_dir(Path(model_dir)).norm_size)


def load(
    model_dir: Path, device: str | torch.device | None = None, *, precision: str = "fp32"
) -> SalientPredictor:
    """Build the salient predictor of a ModelScope model directory, strictly.

    Args:
        model_dir: holds ``pytorch_model.pt`` and, for SENet, ``config.py``.
        device: ``"cpu"``, ``"cuda"``, … or ``None`` for the best available.
        precision: ``"fp32"`` (default, what parity is proven at), ``"bf16"`` or ``"fp16"``
            (autocast; fp16 needs CUDA).

    Returns:
        A :class:`SalientPredictor`; ``predict(images)`` gives (H, W) uint8 masks.
    """
    model_dir = Path(model_dir)
    dev = resolve_device(device)
    check_precision(precision, dev)
    weights = read_model_dir(model_dir)
    net = build_network(weights.variant, read_config(model_dir))
    check_input_size(weights.norm_size, net, model_dir)
    path = model_dir / WEIGHTS_FILE
    convert = partial(convert_senet, model=net) if isinstance(net, SENet) else convert_u2net
    load_checkpoint(net, path, convert)
    version = file_version(path)
    logger.info("loaded salient %s from %s (version %s)", weights.variant, model_dir, version)
    return SalientPredictor(net, weights, version, dev, precision=precision, weights_path=path)
