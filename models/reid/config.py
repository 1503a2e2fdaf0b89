"""Configuration of PASS re-ID: the architecture (frozen dataclasses, ``FULL`` and ``TINY``), the
provenance of ModelScope's weights, and ModelScope's ``configuration.json`` ↔ :class:`ReidConfig`.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vbatch.models.entry import ModelEntry

logger = logging.getLogger(__name__)

FUSIONS = ("cat", "mean")
NECK_FEATS = ("before", "after")
#: the reference hard-codes 16×16 patches (``vit_base_patch16_224_TransReID``)
PATCH_SIZE = 16
#: class token + three part tokens
NUM_TOKENS = 4


@dataclass(frozen=True)
class ViTCfg:
    """Transformer dimensions. ModelScope's configuration cannot change them (ViT-B/16 is hard-coded);
    vbatch reads smaller ones from an optional ``vbatch_backbone`` entry for tests."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        for name in ("embed_dim", "depth", "num_heads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"ViTCfg.{name} must be a positive integer, got {v!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"ViTCfg.embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})"
            )
        if isinstance(self.mlp_ratio, bool) or not isinstance(self.mlp_ratio, (int, float)):
            raise ValueError(f"ViTCfg.mlp_ratio must be a number, got {self.mlp_ratio!r}")
        if int(self.embed_dim * self.mlp_ratio) <= 0:
            raise ValueError(f"ViTCfg.mlp_ratio must be positive, got {self.mlp_ratio!r}")


@dataclass(frozen=True)
class ReidConfig:
    """Everything the network and its preprocessing need, parsed from ``configuration.json``.

    ``image_size`` is both the resize target of preprocessing and the size the position embedding was
    trained for (ModelScope's ``SIZE_TEST`` must equal ``SIZE_TRAIN``).
    """

    #: (height, width) of the network input, ModelScope's ``INPUT.SIZE_TRAIN``/``SIZE_TEST``
    image_size: tuple[int, int] = (256, 128)
    #: (vertical, horizontal) patch stride, ``MODEL.STRIDE_SIZE``; below 16 the patches overlap
    stride: tuple[int, int] = (16, 16)
    vit: ViTCfg = field(default_factory=ViTCfg)
    #: ``MODEL.FEAT_FUSION``: "cat" (2·D output) or "mean" (D output)
    feat_fusion: str = "cat"
    #: ``MODEL.MULTI_NECK``: one BatchNorm per token instead of one over the fused vector
    multi_neck: bool = True
    #: ``TEST.NECK_FEAT``: the embedding is taken "before" or "after" the BN neck
    neck_feat: str = "before"
    #: ``INPUT.PIXEL_MEAN``/``PIXEL_STD`` on the 0..1 scale, RGB order
    pixel_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    pixel_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    #: ``DATASETS.NUM_CLASSES``: rows of the training ID classifier that checkpoints carry (dropped on
    #: load; kept so that a written model directory looks like a trained one)
    num_classes: int = 751

    def __post_init__(self) -> None:
        for name, pair in (("image_size", self.image_size), ("stride", self.stride)):
            if len(pair) != 2 or any(
                isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in pair
            ):
                raise ValueError(f"ReidConfig.{name} must be two positive integers, got {pair!r}")
        if min(self.image_size) < PATCH_SIZE:
            raise ValueError(
                f"ReidConfig.image_size {self.image_size} is smaller than a {PATCH_SIZE}-pixel patch"
            )
        if self.feat_fusion not in FUSIONS:
            raise ValueError(
                f"ReidConfig.feat_fusion must be one of {FUSIONS}, got {self.feat_fusion!r}"
            )
        if self.neck_feat not in NECK_FEATS:
            raise ValueError(
                f"ReidConfig.neck_feat must be one of {NECK_FEATS}, got {self.neck_feat!r}"
            )
        if not isinstance(self.multi_neck, bool):
            raise ValueError(f"ReidConfig.multi_neck must be a bool, got {self.multi_neck!r}")
        if len(self.pixel_mean) != 3 or len(self.pixel_std) != 3 or min(self.pixel_std) <= 0:
            raise ValueError(
                f"ReidConfig.pixel_mean/pixel_std must be 3 numbers each with std > 0, "
                f"got {self.pixel_mean!r} / {self.pixel_std!r}"
            )

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, columns) of patches: ``(size - 16) // stride + 1`` per axis, as a strided conv gives."""
        (h, w), (sh, sw) = self.image_size, self.stride
        return (h - PATCH_SIZE) // sh + 1, (w - PATCH_SIZE) // sw + 1

    @property
    def num_patches(self) -> int:
        rows, cols = self.grid
        return rows * cols

    @property
    def embed_dim(self) -> int:
        """Length of the output embedding (1536 for the released model)."""
        return self.vit.embed_dim * (2 if self.feat_fusion == "cat" else 1)


#: damo/cv_passvitb_image-reid-person_market as PASS-reID's Market-1501 ViT-B recipe configures it
FULL = ReidConfig()
#: the same code at test size: 2 blocks of width 64, a 64×32 input with overlapping 12-pixel strides
TINY = ReidConfig(
    image_size=(64, 32),
    stride=(12, 12),
    vit=ViTCfg(embed_dim=64, depth=2, num_heads=2, mlp_ratio=4.0),
    num_classes=7,
)
#: length of the released model's embedding: cat(cls, mean of the three part tokens), 2 × 768
EMBED_DIM = FULL.embed_dim


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


#: what the pipeline needs to know about this model (vbatch.models.registry collects it)
ENTRY = ModelEntry(
    name="reid",
    module="vbatch.models.reid",
    output="embedding",
    modelscope_id=MODELSCOPE_ID,
    summary="person re-ID embeddings (PASS ViT-B/16, 1536-d)",
    required_files=(WEIGHTS_FILE,),
    checkpoint=WEIGHTS_FILE,
    options=("precision",),
    # ViT-B/16 at 256×128: tiny activations; large batches keep a GPU busy
    batch_cpu=32,
    batch_gpu=128,
    actor_memory_gb=2.0,
    # bf16 on AMX: 3.2x the fp32 forward, min cosine 0.99998, recall@10/mAP unchanged (BENCHMARKS)
    default_precision="auto",
)
