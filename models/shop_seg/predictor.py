"""The shop-seg predictor and :func:`load`: a ModelScope model directory → DenseCLIP on a device.

    predictor = load(model_dir, device="cuda", precision="bf16")
    masks = predictor.predict([rgb_uint8_image, ...])   # (H, W) uint8 0/255 each

Reference: ModelScope 1.40.2 ``pipelines/cv/shop_segmentation_pipleline.py``.
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
from vbatch.models.shop_seg.config import WEIGHTS, read_config
from vbatch.models.shop_seg.convert import convert_modelscope
from vbatch.models.shop_seg.model import ShopSegNet
from vbatch.models.shop_seg.tokenizer import ClipTokenizer
from vbatch.models.shop_seg.transforms import ShopSegTransforms

logger = logging.getLogger(__name__)


class ShopSegPredictor(Predictor):
    """The network on its device. ``forward``: preprocessed inputs → (S, S) uint8 class maps.

    The output is the argmax map at S² (1 MB per image at 1024²), not logits: it is what the
    reference's postprocess starts from, and the smallest thing to bring back from the device.
    """

    name = "shop-seg"

    def __init__(
        self,
        model: ShopSegNet,
        transforms: ShopSegTransforms,
        device: torch.device,
        precision: str,
        model_version: str,
    ) -> None:
        check_precision(precision, device)
        self.model = model
        self.transforms = transforms
        self.device = device
        self.precision = precision
        self.model_version = model_version

    def logits(self, inputs: Sequence[np.ndarray]) -> torch.Tensor:
        """Args: inputs: B arrays (S, S, 4) uint8 from ``transforms.preprocess``. Returns: (B, 2, S/4, S/4) float32."""
        batch = torch.from_numpy(np.stack(inputs))
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        batch = batch.to(self.device, non_blocking=True)
        with torch.inference_mode(), autocast(self.precision, self.device):
            return self.model(self.model.normalize(batch)).float()

    def forward(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Args: inputs: B arrays (S, S, 4) uint8. Returns: B arrays (S, S) uint8, 1 = foreground."""
        if len(inputs) == 0:  # also accepts one (B, S, S, 4) array
            return []
        logits = self.logits(inputs)
        with torch.inference_mode():
            maps = self.model.segment(logits).cpu().numpy()
        return list(maps)


def load_transforms(model_dir: Path) -> ShopSegTransforms:
    """Pre/post-processing for the model directory (its input size; no weights read)."""
    return ShopSegTransforms(read_config(Path(model_dir)).image_size)


def load(
    model_dir: Path, device: str | torch.device | None = None, *, precision: str = "fp32"
) -> ShopSegPredictor:
    """Build the network from a ModelScope shop-seg directory, strictly.

    Args:
        model_dir: folder with ``pytorch_model.bin`` and ``bpe_simple_vocab_16e6.txt.gz``.
        device: ``"cpu"``, ``"cuda[:n]"`` or ``None`` for the best available.
        precision: ``"fp32"`` (as the reference), or ``"bf16"``/``"fp16"`` autocast (fp16: CUDA only).
            The prompt features are always computed in fp32.

    Returns:
        A :class:`ShopSegPredictor` in eval mode on ``device``.
    """
    model_dir = Path(model_dir)
    dev = resolve_device(device)
    check_precision(precision, dev)
    config = read_config(model_dir)
    vocab = model_dir / WEIGHTS.vocab
    if not vocab.is_file():
        raise FileNotFoundError(
            f"{model_dir}: no {WEIGHTS.vocab} (CLIP's BPE vocabulary) in the model directory"
        )
    tokenizer = ClipTokenizer(vocab)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(
            f"{vocab}: {tokenizer.vocab_size} tokens, the text encoder embeds {config.vocab_size}"
        )
    ckpt = model_dir / WEIGHTS.checkpoint
    model = ShopSegNet(config)
    load_checkpoint(model, ckpt, convert_modelscope)
    # the prompt features depend on weights only: encode them once, in fp32 on the CPU
    model.set_prompts(torch.from_numpy(tokenizer(list(config.prompts), config.prompt_length)))
    model.to(dev)
    logger.info("shop-seg loaded from %s on %s (%s)", model_dir, dev, precision)
    return ShopSegPredictor(
        model, ShopSegTransforms(config.image_size), dev, precision, file_version(ckpt)
    )
