"""shop-seg: product segmentation with DenseCLIP (ModelScope ``damo/cv_vitb16_segmentation_shop-seg``).

DenseCLIP (Rao et al., CVPR 2022) with a CLIP ViT-B/16 image encoder at 1024²; reference
implementation ModelScope 1.40.2 ``models/cv/shop_segmentation/`` and
``pipelines/cv/shop_segmentation_pipleline.py``.

    predictor = load(model_dir, device="cuda", precision="bf16")
    masks = predictor.predict([rgb_uint8_image, ...])   # (H, W) uint8 0/255 each

The model directory is ModelScope's: ``pytorch_model.bin`` (the ``SHOPSEG`` state dict) and
``bpe_simple_vocab_16e6.txt.gz`` (CLIP's BPE merges). Test directories written by
:func:`write_random_model_dir` for another config also hold ``vbatch_shop_seg.json``.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import json
import logging
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from vbatch.models.base import Predictor, resolve_device
from vbatch.models.checkpoint import file_version, load_checkpoint
from vbatch.models.shop_seg.convert import convert_modelscope, to_modelscope
from vbatch.models.shop_seg.model import (
    FULL,
    TINY,
    WEIGHTS,
    ShopSegConfig,
    ShopSegNet,
    activation_bytes_per_image,
    randomize_,
    read_config,
)
from vbatch.models.shop_seg.tokenizer import ClipTokenizer
from vbatch.models.shop_seg.transforms import ShopSegTransforms

logger = logging.getLogger(__name__)

__all__ = [
    "FULL",
    "TINY",
    "ShopSegConfig",
    "ShopSegNet",
    "ShopSegPredictor",
    "ShopSegTransforms",
    "activation_bytes_per_image",
    "load",
    "load_transforms",
    "write_random_model_dir",
]

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def load_transforms(model_dir: Path) -> ShopSegTransforms:
    """Pre/post-processing for the model directory (its input size; no weights read)."""
    return ShopSegTransforms(read_config(Path(model_dir)).image_size)


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
        self.model = model
        self.transforms = transforms
        self.device = device
        self.precision = precision
        self.model_version = model_version

    def _autocast(self) -> contextlib.AbstractContextManager[None]:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_AUTOCAST[self.precision])

    def logits(self, inputs: Sequence[np.ndarray]) -> torch.Tensor:
        """Args: inputs: B arrays (S, S, 4) uint8 from ``transforms.preprocess``. Returns: (B, 2, S/4, S/4) float32."""
        batch = torch.from_numpy(np.stack(inputs))
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        batch = batch.to(self.device, non_blocking=True)
        with torch.inference_mode(), self._autocast():
            return self.model(self.model.normalize(batch)).float()

    def forward(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Args: inputs: B arrays (S, S, 4) uint8. Returns: B arrays (S, S) uint8, 1 = foreground."""
        if len(inputs) == 0:  # also accepts one (B, S, S, 4) array
            return []
        logits = self.logits(inputs)
        with torch.inference_mode():
            maps = self.model.segment(logits).cpu().numpy()
        return list(maps)


def _check_precision(device: torch.device, precision: str) -> None:
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be 'fp32', 'bf16' or 'fp16', got {precision!r}")
    if device.type == "cpu" and precision == "fp16":
        raise ValueError("fp16 needs a CUDA device; on CPU use precision='fp32' or 'bf16'")
    if device.type not in ("cpu", "cuda") and precision != "fp32":
        raise ValueError(
            f"precision {precision!r} is only supported on CPU and CUDA, not {device.type}"
        )


def load(
    model_dir: Path, device: str | torch.device | None = None, precision: str = "fp32"
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
    _check_precision(dev, precision)
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


@contextlib.contextmanager
def _atomic_dir(path: Path) -> Iterator[Path]:
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


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
    with _atomic_dir(path) as tmp:
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
    return path
