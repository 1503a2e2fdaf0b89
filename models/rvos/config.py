"""Architecture of MTTR (frozen dataclasses), the provenance of ModelScope's weights, and the
model directory's configuration read as data (:func:`read_config`).

The layout (``damo/cv_swin-t_referring_video-object-segmentation``)::

    configuration.json          # "model": transformer sizes, "pipeline": dataset_name, ...
    pytorch_model.pt            # MTTR state dict, possibly wrapped in "model_state_dict"
    transformer_cfg_dir/        # RoBERTa: config.json, tokenizer (vocab.json, merges.txt, tokenizer.json)
                                # and, in the shipped model, roberta-base weights the checkpoint overrides

The architecture is read from a ModelScope model directory (:func:`read_config`):
``configuration.json``'s ``model`` section gives the multimodal transformer, the RoBERTa
``config.json`` in ``transformer_cfg_dir`` gives the text encoder, and the video Swin-T backbone is
fixed in the reference (``VideoSwinTransformerBackbone`` hard-codes it), so :class:`SwinConfig`'s
defaults are the only Swin the reference can load. ``FULL`` is the shipped model; ``TINY`` is the
same code at toy sizes for fast tests (its Swin is smaller than the reference accepts, so a TINY
model directory records its backbone under an extra ``backbone_config`` key that the reference
ignores).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from vbatch.models.base import CheckpointError
from vbatch.models.entry import ModelEntry

# --- provenance of the shipped weights (kept apart from the architecture, like timm's PretrainedCfg)
MODELSCOPE_ID = "damo/cv_swin-t_referring_video-object-segmentation"
CONFIG_FILE = "configuration.json"
WEIGHTS_FILE = "pytorch_model.pt"  # ModelScope's ModelFile.TORCH_MODEL_FILE
TEXT_DIR = "transformer_cfg_dir"  # RoBERTa config + tokenizer (+ weights the checkpoint overrides)
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SHORT_SIDE = 360  # the pipeline's F.resize(size=360, max_size=640)
MAX_SIDE = 640
WINDOW = 24  # frames per window in the pipeline
OVERLAP = 6  # frames shared by consecutive windows; windows start every WINDOW - OVERLAP frames


@dataclass(frozen=True)
class SwinConfig:
    """The video Swin backbone as MTTR uses it: Swin-T's first three stages, no temporal downsampling.

    ``depths``/``num_heads`` list the stages that are kept (MTTR drops Swin-T's fourth stage); stage
    ``i`` has ``embed_dim * 2**i`` channels at stride ``4 * 2**i``.
    """

    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6)
    num_heads: tuple[int, ...] = (3, 6, 12)
    window_size: tuple[int, int, int] = (8, 7, 7)  # (frames, height, width), in tokens
    patch_size: tuple[int, int, int] = (1, 4, 4)  # (1, ...) keeps one feature map per frame
    mlp_ratio: float = 4.0

    @property
    def channels(self) -> tuple[int, ...]:
        """Channels of each stage's output."""
        return tuple(self.embed_dim * 2**i for i in range(len(self.depths)))


@dataclass(frozen=True)
class TextConfig:
    """The RoBERTa text encoder (fields of ``transformer_cfg_dir/config.json``); defaults: roberta-base."""

    vocab_size: int = 50265
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2


@dataclass(frozen=True)
class RVOSConfig:
    """MTTR: video Swin backbone + RoBERTa + multimodal DETR-style transformer + FPN mask decoder."""

    swin: SwinConfig = field(default_factory=SwinConfig)
    text: TextConfig = field(default_factory=TextConfig)
    d_model: int = 256
    nheads: int = 8
    dim_feedforward: int = 2048
    num_encoder_layers: int = 3
    num_decoder_layers: int = 3
    num_queries: int = (
        50  # object-query slots; one is chosen per window by mean "is referred" score
    )
    mask_kernels_dim: int = 8
    activation: str = "relu"

    def __post_init__(self) -> None:
        # the FPN decoder narrows d_model down to d_model // 8 channels under GroupNorm(8, ·)
        if self.d_model % 64:
            raise ValueError(f"d_model must be a multiple of 64, got {self.d_model}")
        if self.activation not in ("relu", "gelu"):
            raise ValueError(f"activation must be relu or gelu, got {self.activation!r}")


FULL = RVOSConfig()

TINY = RVOSConfig(
    swin=SwinConfig(embed_dim=16, depths=(2, 2, 2), num_heads=(1, 2, 4), window_size=(2, 3, 3)),
    text=TextConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    ),
    d_model=64,
    nheads=4,
    dim_feedforward=128,
    num_encoder_layers=1,
    num_decoder_layers=2,
    num_queries=5,
)

#: TINY's transformer and text encoder on the real Swin-T: the smallest model the reference loads.
SMALL_REFERENCE = replace(TINY, swin=SwinConfig())


def read_text_config(text_dir: Path) -> TextConfig:
    """The RoBERTa architecture from ``text_dir/config.json`` (parsed as JSON, never executed)."""
    path = text_dir / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the text encoder config {path}: {e}") from e
    if raw.get("model_type", "roberta") != "roberta":
        raise ValueError(f"{path}: model_type {raw.get('model_type')!r}, expected 'roberta'")
    fields = TextConfig.__dataclass_fields__
    return TextConfig(**{k: raw[k] for k in fields if k in raw})


# the model section's defaults in the reference's constructors (MTTR, MultimodalTransformer, layers)
_DEFAULTS = {
    "mask_kernels_dim": 8,
    "num_encoder_layers": 3,
    "num_decoder_layers": 3,
    "dim_feedforward": 2048,
    "activation": "relu",
    "normalize_before": False,
    "text_encoder_type": "roberta-base",
}


def read_config(model_dir: Path) -> RVOSConfig:
    """The architecture of the model in ``model_dir`` (``configuration.json`` + the RoBERTa config).

    Raises:
        CheckpointError: the directory is not an MTTR model directory this port can run.
    """
    path = model_dir / CONFIG_FILE
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    m = {**_DEFAULTS, **raw.get("model", {})}
    problems = []
    if m.get("backbone_name") != "swin-t":
        problems.append(f"backbone_name {m.get('backbone_name')!r} (only 'swin-t' is supported)")
    if m["text_encoder_type"] != "roberta-base":
        # the reference would then fetch that model from the Hugging Face hub
        problems.append(
            f"text_encoder_type {m['text_encoder_type']!r} (only 'roberta-base' is supported)"
        )
    if m["normalize_before"]:
        problems.append("normalize_before=true (pre-norm transformer layers are not implemented)")
    dataset = raw.get("pipeline", {}).get("dataset_name", "ref_youtube_vos")
    if "ref_youtube_vos" not in dataset:
        problems.append(
            f"pipeline.dataset_name {dataset!r} (only Ref-YouTube-VOS postprocessing is implemented)"
        )
    missing = [k for k in ("d_model", "nheads", "num_queries") if k not in m]
    if missing:
        problems.append(f"model section lacks {missing}")
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems))
    swin = SwinConfig()
    if "backbone_config" in m:  # vbatch's extension for small test models; the reference ignores it
        b = m["backbone_config"]
        try:
            swin = SwinConfig(
                embed_dim=int(b["embed_dim"]),
                depths=tuple(int(d) for d in b["depths"]),
                num_heads=tuple(int(n) for n in b["num_heads"]),
                window_size=(
                    int(b["window_size"][0]),
                    int(b["window_size"][1]),
                    int(b["window_size"][2]),
                ),
                patch_size=(
                    int(b["patch_size"][0]),
                    int(b["patch_size"][1]),
                    int(b["patch_size"][2]),
                ),
                mlp_ratio=float(b["mlp_ratio"]),
            )
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: bad model.backbone_config {b!r}: {e!r}") from e
    try:
        text = read_text_config(model_dir / TEXT_DIR)
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    return RVOSConfig(
        swin=swin,
        text=text,
        d_model=int(m["d_model"]),
        nheads=int(m["nheads"]),
        dim_feedforward=int(m["dim_feedforward"]),
        num_encoder_layers=int(m["num_encoder_layers"]),
        num_decoder_layers=int(m["num_decoder_layers"]),
        num_queries=int(m["num_queries"]),
        mask_kernels_dim=int(m["mask_kernels_dim"]),
        activation=str(m["activation"]),
    )


#: what the pipeline needs to know about this model (vbatch.models.registry collects it)
ENTRY = ModelEntry(
    name="rvos",
    module="vbatch.models.rvos",
    output="video-masks",
    modelscope_id=MODELSCOPE_ID,
    summary="referring video object segmentation (MTTR, video Swin-T + RoBERTa)",
    required_files=(WEIGHTS_FILE, CONFIG_FILE),
    checkpoint=WEIGHTS_FILE,
    options=("precision",),
    # windows (of WINDOW frames) per model call: one window is already a batch of 24 frames, the
    # GPU's work unit for MTTR; more per call only keeps more frames alive in the actor
    batch_cpu=1,
    batch_gpu=1,
    actor_memory_gb=6.0,
    metric_kind="video-mask",
    visual="outline",
)
