"""The re-ID predictor and :func:`load`: a ModelScope model directory → PASS ViT-B/16 on a device.

``load(model_dir).predict(list of RGB uint8 arrays)`` returns one float32 (1536,) embedding per image,
exactly what ModelScope 1.40.2's ``pipelines/cv/image_reid_person_pipeline.py`` returns (not
L2-normalised).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from vbatch.models.base import Predictor, resolve_device
from vbatch.models.checkpoint import file_version, load_checkpoint
from vbatch.models.precision import autocast, check_precision
from vbatch.models.reid.config import WEIGHTS_FILE, read_config
from vbatch.models.reid.convert import from_modelscope
from vbatch.models.reid.model import ReidNet
from vbatch.models.reid.transforms import ReidTransforms

logger = logging.getLogger(__name__)


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
        check_precision(precision, device)
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
        with torch.inference_mode(), autocast(self.precision, self.device):
            out = self.net(batch.permute(0, 3, 1, 2))
        return list(out.float().cpu().numpy())


def load_transforms(model_dir: Path) -> ReidTransforms:
    """The CPU pre/post-processing, from ``configuration.json`` only."""
    cfg = read_config(model_dir)
    return ReidTransforms(cfg.image_size, cfg.embed_dim)


def load(
    model_dir: Path, device: str | torch.device | None = None, *, precision: str = "fp32"
) -> ReidPredictor:
    """Build the network from a ModelScope model directory, strictly.

    Args:
        model_dir: folder with ``configuration.json`` and ``pytorch_model.pt``.
        device: ``"cpu"``, ``"cuda"``, … or ``None`` for the best available.
        precision: ``"fp32"`` (default, the reference's), ``"bf16"`` or ``"fp16"`` (autocast; fp16
            needs CUDA; not parity-checked).

    Returns:
        A :class:`ReidPredictor`.

    Raises:
        ReidConfigError: the configuration is missing an option or has one the reference cannot run.
        CheckpointError: the checkpoint does not fit (every missing/unexpected/mis-shaped key listed).
    """
    dev = resolve_device(device)
    check_precision(precision, dev)
    model_dir = Path(model_dir)
    cfg = read_config(model_dir)
    weights = model_dir / WEIGHTS_FILE
    net = ReidNet(cfg)
    load_checkpoint(net, weights, from_modelscope)
    logger.info("reid: %s on %s (%s, %d-d embedding)", model_dir, dev, precision, cfg.embed_dim)
    return ReidPredictor(
        net, ReidTransforms(cfg.image_size, cfg.embed_dim), dev, file_version(weights), precision
    )
