"""shop-seg: product segmentation with DenseCLIP (ModelScope ``damo/cv_vitb16_segmentation_shop-seg``).

DenseCLIP (Rao et al., CVPR 2022) with a CLIP ViT-B/16 image encoder at 1024²; reference
implementation ModelScope 1.40.2 ``models/cv/shop_segmentation/`` and
``pipelines/cv/shop_segmentation_pipleline.py``.

The model directory is ModelScope's: ``pytorch_model.bin`` (the ``SHOPSEG`` state dict) and
``bpe_simple_vocab_16e6.txt.gz`` (CLIP's BPE merges). Test directories written by
:func:`vbatch.models.shop_seg.modeldir.write_random_model_dir` for another config also hold
``vbatch_shop_seg.json``. Files follow ``models/README.md``; ``clip.py`` (image and text encoders),
``decoder.py`` (context decoder, FPN) and ``tokenizer.py`` (CLIP's BPE) are sub-modules of ``model.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vbatch.models.lazy import lazy_exports

if TYPE_CHECKING:
    from vbatch.models.shop_seg.config import FULL, TINY, WEIGHTS, ShopSegConfig, read_config
    from vbatch.models.shop_seg.model import ShopSegNet, activation_bytes_per_image
    from vbatch.models.shop_seg.predictor import ShopSegPredictor, load, load_transforms
    from vbatch.models.shop_seg.transforms import ShopSegTransforms

# imported on first use: the CPU stages import the transforms only (no torch), see models/lazy.py
__getattr__ = lazy_exports(
    __name__,
    {
        "vbatch.models.shop_seg.config": (
            "FULL",
            "TINY",
            "WEIGHTS",
            "ShopSegConfig",
            "read_config",
        ),
        "vbatch.models.shop_seg.model": ("ShopSegNet", "activation_bytes_per_image"),
        "vbatch.models.shop_seg.predictor": ("ShopSegPredictor", "load", "load_transforms"),
        "vbatch.models.shop_seg.transforms": ("ShopSegTransforms",),
    },
)

__all__ = [
    "FULL",
    "TINY",
    "WEIGHTS",
    "ShopSegConfig",
    "ShopSegNet",
    "ShopSegPredictor",
    "ShopSegTransforms",
    "activation_bytes_per_image",
    "load",
    "load_transforms",
    "read_config",
]
