"""ModelScope's PASS re-ID model directory → vbatch: ``configuration.json`` → :class:`ReidConfig`, and
the ``pytorch_model.pt`` state dict → :class:`~vbatch.models.reid.model.ReidNet` keys.

Reference: ModelScope 1.40.2 ``models/cv/image_reid_person/pass_model.py`` (which options it reads and
what it does with them) and ``pipelines/cv/image_reid_person_pipeline.py`` (``INPUT.SIZE_TEST``,
``PIXEL_MEAN``, ``PIXEL_STD``). Every option the reference reads is read here; each is either honoured
or, where the reference cannot run with it, rejected with the reason. The configuration is parsed as
data (JSON), never executed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from vbatch.models.checkpoint import CheckpointError, StateDict
from vbatch.models.reid.model import FUSIONS, NECK_FEATS, PATCH_SIZE, ReidConfig, ViTCfg

logger = logging.getLogger(__name__)

MODELSCOPE_ID = "damo/cv_passvitb_image-reid-person_market"
CONFIG_FILE = "configuration.json"
WEIGHTS_FILE = "pytorch_model.pt"
#: ``model.type`` of the PASS model in ModelScope's registry (``Models.image_reid_person``)
MODELSCOPE_MODEL_TYPE = "passvitb"
MODELSCOPE_TASK = "image-reid-person"
MODELSCOPE_PIPELINE = "passvitb-image-reid-person"
#: vbatch's own optional top-level entry of configuration.json: transformer dimensions
#: ({"embed_dim", "depth", "num_heads", "mlp_ratio"}), which ModelScope hard-codes to ViT-B/16 and
#: ignores. Only vbatch's test/demo model directories carry it; such a directory is not loadable by
#: ModelScope (its loader would silently skip every mis-shaped weight).
VBATCH_BACKBONE_KEY = "vbatch_backbone"

# Values ModelScope reads that have no effect at inference, written into model directories we create
# (PASS-reID's Market-1501 recipe). SIE_COE scales camera/view embeddings the reference never builds.
_INFERENCE_NEUTRAL = {
    "SIE_COE": 3.0,
    "DROP_PATH": 0.1,
    "DROP_OUT": 0.0,
    "ATT_DROP_RATE": 0.0,
    "DROPOUT_RATE": 0.0,
}


class ReidConfigError(ValueError):
    """``configuration.json`` is missing an option the reference reads, or has a value it cannot run."""


# ----------------------------------------------------------------------------------------------------
# configuration.json


def _get(d: Mapping[str, Any], path: str, source: str) -> Any:
    node: Any = d
    for i, part in enumerate(path.split(".")):
        if not isinstance(node, Mapping):
            raise ReidConfigError(f"{source}: '{'.'.join(path.split('.')[:i])}' is not an object")
        if part not in node:
            raise ReidConfigError(f"{source}: missing '{path}' (the ModelScope reference reads it)")
        node = node[part]
    return node


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _size(v: Any, key: str, source: str) -> tuple[int, int]:
    # T.Resize(int) would resize the shorter side only, giving a variable patch count the fixed
    # position embedding cannot take: the reference only works with an explicit [height, width]
    if not (isinstance(v, list) and len(v) == 2 and all(_is_int(x) and x >= PATCH_SIZE for x in v)):
        raise ReidConfigError(
            f"{source}: '{key}' must be [height, width], two integers >= {PATCH_SIZE}, got {v!r}"
        )
    return int(v[0]), int(v[1])


def _bool(v: Any, key: str, source: str) -> bool:
    if not isinstance(v, bool):
        raise ReidConfigError(f"{source}: '{key}' must be true or false, got {v!r}")
    return v


def _choice(v: Any, key: str, choices: tuple[str, ...], source: str) -> str:
    if v not in choices:
        raise ReidConfigError(f"{source}: '{key}' must be one of {list(choices)}, got {v!r}")
    return v


def _triple(v: Any, key: str, source: str, positive: bool = False) -> tuple[float, float, float]:
    if not (isinstance(v, list) and len(v) == 3 and all(_is_num(x) for x in v)) or (
        positive and min(v) <= 0
    ):
        what = "three positive numbers" if positive else "three numbers"
        raise ReidConfigError(f"{source}: '{key}' must be {what} (RGB, 0..1 scale), got {v!r}")
    return float(v[0]), float(v[1]), float(v[2])


def _backbone(v: Any, source: str) -> ViTCfg:
    if not isinstance(v, Mapping):
        raise ReidConfigError(f"{source}: '{VBATCH_BACKBONE_KEY}' must be an object, got {v!r}")
    allowed = {"embed_dim", "depth", "num_heads", "mlp_ratio"}
    unknown = sorted(set(v) - allowed)
    if unknown:
        raise ReidConfigError(
            f"{source}: unknown '{VBATCH_BACKBONE_KEY}' entries {unknown}; allowed: {sorted(allowed)}"
        )
    try:
        return ViTCfg(**v)
    except (TypeError, ValueError) as e:
        raise ReidConfigError(f"{source}: '{VBATCH_BACKBONE_KEY}': {e}") from None


def config_from_modelscope(obj: Mapping[str, Any], source: str = CONFIG_FILE) -> ReidConfig:
    """Parse a loaded ``configuration.json``.

    Args:
        obj: the JSON object.
        source: name used in error messages (the file path).

    Returns:
        The validated :class:`ReidConfig`.

    Raises:
        ReidConfigError: an option the reference reads is missing, or has a value the reference
            cannot run with; the message names the option.
    """
    model_type = _get(obj, "model.type", source)
    if model_type != MODELSCOPE_MODEL_TYPE:
        raise ReidConfigError(
            f"{source}: 'model.type' is {model_type!r}, not {MODELSCOPE_MODEL_TYPE!r} (the PASS re-ID model)"
        )
    if not isinstance(_get(obj, "model.cfg", source), Mapping):
        raise ReidConfigError(f"{source}: 'model.cfg' must be an object")
    g = lambda key: _get(obj, "model.cfg." + key, source)  # noqa: E731

    # --- read by ImageReidPersonPipeline (preprocessing)
    size_test = _size(g("INPUT.SIZE_TEST"), "INPUT.SIZE_TEST", source)
    mean = _triple(g("INPUT.PIXEL_MEAN"), "INPUT.PIXEL_MEAN", source)
    std = _triple(g("INPUT.PIXEL_STD"), "INPUT.PIXEL_STD", source, positive=True)

    # --- read by PASS.__init__ / TransReID
    size_train = _size(g("INPUT.SIZE_TRAIN"), "INPUT.SIZE_TRAIN", source)
    if size_test != size_train:
        # the position embedding is sized for SIZE_TRAIN and never interpolated
        raise ReidConfigError(
            f"{source}: 'INPUT.SIZE_TEST' {list(size_test)} differs from 'INPUT.SIZE_TRAIN' "
            f"{list(size_train)}; the reference has no position-embedding interpolation"
        )
    stride_v = g("MODEL.STRIDE_SIZE")
    if _is_int(stride_v):  # the reference's to_2tuple accepts a scalar
        stride_v = [stride_v, stride_v]
    if not (
        isinstance(stride_v, list)
        and len(stride_v) == 2
        and all(_is_int(s) and s > 0 for s in stride_v)
    ):
        raise ReidConfigError(
            f"{source}: 'MODEL.STRIDE_SIZE' must be a positive integer or [vertical, horizontal], got {stride_v!r}"
        )
    for key in (
        "MODEL.SIE_COE",
        "MODEL.DROP_PATH",
        "MODEL.DROP_OUT",
        "MODEL.ATT_DROP_RATE",
        "MODEL.DROPOUT_RATE",
    ):
        # no effect at inference: the reference builds TransReID without cameras/views (SIE unused)
        # and evaluates in eval mode (dropout and drop-path are identities)
        v = g(key)
        if not _is_num(v):
            raise ReidConfigError(f"{source}: '{key}' must be a number, got {v!r}")
        if key != "MODEL.SIE_COE" and not 0 <= v < 1:
            raise ReidConfigError(f"{source}: '{key}' must be a rate in [0, 1), got {v!r}")
    if _bool(g("MODEL.GEM_POOLING"), "MODEL.GEM_POOLING", source):
        raise ReidConfigError(
            f"{source}: 'MODEL.GEM_POOLING' true is not supported: the reference's TransReID then returns "
            f"one pooled feature instead of the four token features PASS.forward unpacks, and fails"
        )
    if _bool(g("MODEL.STEM_CONV"), "MODEL.STEM_CONV", source):
        raise ReidConfigError(
            f"{source}: 'MODEL.STEM_CONV' true is not supported: the reference's convolutional stem uses "
            f"an IBN layer that ModelScope does not define, so it cannot be built"
        )
    multi_neck = _bool(g("MODEL.MULTI_NECK"), "MODEL.MULTI_NECK", source)
    fusion = _choice(g("MODEL.FEAT_FUSION"), "MODEL.FEAT_FUSION", FUSIONS, source)
    # the reference treats anything but 'after' as 'before'; a typo should not silently pick one
    neck_feat = _choice(g("TEST.NECK_FEAT"), "TEST.NECK_FEAT", NECK_FEATS, source)
    num_classes = g("DATASETS.NUM_CLASSES")
    if not (_is_int(num_classes) and num_classes > 0):
        raise ReidConfigError(
            f"{source}: 'DATASETS.NUM_CLASSES' must be a positive integer, got {num_classes!r}"
        )

    vit = _backbone(obj[VBATCH_BACKBONE_KEY], source) if VBATCH_BACKBONE_KEY in obj else ViTCfg()
    try:
        return ReidConfig(
            image_size=size_train,
            stride=(int(stride_v[0]), int(stride_v[1])),
            vit=vit,
            feat_fusion=fusion,
            multi_neck=multi_neck,
            neck_feat=neck_feat,
            pixel_mean=mean,
            pixel_std=std,
            num_classes=int(num_classes),
        )
    except ValueError as e:
        raise ReidConfigError(f"{source}: {e}") from None


def read_config(model_dir: str | Path) -> ReidConfig:
    """Read and validate ``<model_dir>/configuration.json``."""
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise ReidConfigError(
            f"{path}: not found (a ModelScope model directory holds {CONFIG_FILE})"
        )
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReidConfigError(f"{path}: cannot read as JSON: {e}") from e
    if not isinstance(obj, Mapping):
        raise ReidConfigError(f"{path}: expected a JSON object")
    return config_from_modelscope(obj, str(path))


def config_to_modelscope(cfg: ReidConfig) -> dict[str, Any]:
    """The ``configuration.json`` object ModelScope's pipeline (and :func:`config_from_modelscope`)
    reads for ``cfg``; a non-ViT-B backbone is written under :data:`VBATCH_BACKBONE_KEY`."""
    out: dict[str, Any] = {
        "framework": "pytorch",
        "task": MODELSCOPE_TASK,
        "pipeline": {"type": MODELSCOPE_PIPELINE},
        "model": {
            "type": MODELSCOPE_MODEL_TYPE,
            "cfg": {
                "INPUT": {
                    "SIZE_TRAIN": list(cfg.image_size),
                    "SIZE_TEST": list(cfg.image_size),
                    "PIXEL_MEAN": list(cfg.pixel_mean),
                    "PIXEL_STD": list(cfg.pixel_std),
                },
                "MODEL": {
                    "STRIDE_SIZE": list(cfg.stride),
                    "GEM_POOLING": False,
                    "STEM_CONV": False,
                    "MULTI_NECK": cfg.multi_neck,
                    "FEAT_FUSION": cfg.feat_fusion,
                    **_INFERENCE_NEUTRAL,
                },
                "TEST": {"NECK_FEAT": cfg.neck_feat},
                "DATASETS": {"NUM_CLASSES": cfg.num_classes},
            },
        },
    }
    if cfg.vit != ViTCfg():
        out[VBATCH_BACKBONE_KEY] = {
            "embed_dim": cfg.vit.embed_dim,
            "depth": cfg.vit.depth,
            "num_heads": cfg.vit.num_heads,
            "mlp_ratio": cfg.vit.mlp_ratio,
        }
    return out


# ----------------------------------------------------------------------------------------------------
# pytorch_model.pt

# ModelScope prefix → ours. Block internals keep timm's names (norm1, attn.qkv, attn.proj, norm2,
# mlp.fc1, mlp.fc2), which the reference's blocks share.
_PREFIXES: tuple[tuple[str, str], ...] = (
    ("base.patch_embed.proj.", "backbone.patch_proj."),
    ("base.pos_embed", "backbone.pos_embed"),
    ("base.blocks.", "backbone.blocks."),
    ("base.norm.", "backbone.norm."),
    ("bottleneck.", "neck.bn."),  # the fused-vector BN, or the cls BN with MULTI_NECK
    ("bottleneck_1.", "neck.part_bns.0."),
    ("bottleneck_2.", "neck.part_bns.1."),
    ("bottleneck_3.", "neck.part_bns.2."),
)
# four (1, 1, D) parameters each, concatenated in this order into one (1, 4, D) parameter of ours
_STACKED: dict[str, tuple[str, ...]] = {
    "backbone.tokens": (
        "base.cls_token",
        "base.part_token1",
        "base.part_token2",
        "base.part_token3",
    ),
    "backbone.token_pos": ("base.cls_pos", "base.part1_pos", "base.part2_pos", "base.part3_pos"),
}
# Keys the checkpoint carries that inference never uses, dropped by name:
_DROPPED: dict[str, str] = {
    # the ID classifier of fine-tuning (cross-entropy over the training identities)
    "classifier.weight": "training-only ID classifier",
    # TransReID's ImageNet head (num_classes=1000 by default); its forward never calls it
    "base.fc.weight": "unused ImageNet head of the backbone",
    "base.fc.bias": "unused ImageNet head of the backbone",
    # camera/view embeddings (SIE): ModelScope builds the backbone with camera=view=0, so they are
    # never created nor added (its loader silently skips them if a checkpoint has them)
    "base.sie_embed": "camera/view embedding the reference never uses",
}


def from_modelscope(sd: StateDict) -> StateDict:
    """Convert ModelScope's PASS state dict to :class:`~vbatch.models.reid.model.ReidNet` keys (pure).

    Args:
        sd: ``pytorch_model.pt`` as read by :func:`vbatch.models.checkpoint.read_state_dict`.

    Returns:
        Our state dict. Keys no rule knows are passed through unchanged, so that the strict load
        reports them as unexpected.

    Raises:
        CheckpointError: a token or token-position parameter is missing or mis-shaped.
    """
    out: StateDict = {}
    stacked_sources = {k for keys in _STACKED.values() for k in keys}
    for key, value in sd.items():
        if key in _DROPPED:
            logger.debug("dropping %s (%s)", key, _DROPPED[key])
            continue
        if key in stacked_sources:
            continue
        for src, dst in _PREFIXES:
            if key.startswith(src):
                out[dst + key[len(src) :]] = value
                break
        else:
            out[key] = value
    for dst, srcs in _STACKED.items():
        missing = [k for k in srcs if k not in sd]
        if missing:
            raise CheckpointError(f"checkpoint is missing keys: {', '.join(missing)}")
        shapes = {k: tuple(sd[k].shape) for k in srcs}
        if any(len(s) != 3 or s[:2] != (1, 1) or s != shapes[srcs[0]] for s in shapes.values()):
            raise CheckpointError(
                "shape mismatches: "
                + ", ".join(f"{k} {s}" for k, s in shapes.items())
                + " (expected four (1, 1, D))"
            )
        out[dst] = torch.cat([sd[k] for k in srcs], dim=1)
    return out


def to_modelscope(sd: StateDict) -> StateDict:
    """Inverse of :func:`from_modelscope` (without the dropped keys): our state dict in ModelScope's
    key names, for writing model directories."""
    out: StateDict = {}
    for key, value in sd.items():
        if key in _STACKED:
            for i, src in enumerate(_STACKED[key]):
                out[src] = value[:, i : i + 1].clone()
            continue
        for src, dst in _PREFIXES:
            if key.startswith(dst):
                out[src + key[len(dst) :]] = value
                break
        else:
            raise KeyError(f"no ModelScope name for {key!r}")
    return out
