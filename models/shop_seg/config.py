"""Configuration of shop-seg: the architecture (frozen dataclass, ``FULL`` and ``TINY``) and the
provenance of the released weights, kept apart (timm's model args vs. ``PretrainedCfg``).

ModelScope's directory hard-codes the architecture (:data:`FULL`); a vbatch test directory for
another one (:data:`TINY`) records it in the side file ``vbatch_shop_seg.json`` (:func:`read_config`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vbatch.models.base import config_from_json, config_to_json
from vbatch.models.entry import ModelEntry


@dataclass(frozen=True)
class ShopSegConfig:
    """Architecture of the network (the released model is :data:`FULL`)."""

    image_size: int = 1024
    patch_size: int = 16
    vision_width: int = 768
    vision_depth: int = 12
    vision_heads: int = 12
    #: blocks whose tokens feed the 4 pyramid levels
    out_indices: tuple[int, int, int, int] = (3, 5, 7, 11)
    #: CLIP embedding size (image ``proj`` and text projection outputs)
    embed_dim: int = 512
    vocab_size: int = 49408
    #: text transformer length = prompt tokens + learned context tokens
    text_context_length: int = 30
    #: tokenised prompt length (CLIP tokens incl. SOT/EOT, zero padded)
    prompt_length: int = 22
    text_width: int = 512
    text_depth: int = 12
    text_heads: int = 8
    decoder_width: int = 256
    decoder_depth: int = 3
    decoder_heads: int = 4
    fpn_channels: int = 256
    #: the class names; the second is the released model's spelling ("foregeound", sic)
    prompts: tuple[str, ...] = ("others", "foregeound")
    #: pyramid level (stride 16) that the text-image score maps are concatenated to
    score_level: int = 2

    @property
    def num_classes(self) -> int:
        return len(self.prompts)

    @property
    def num_context(self) -> int:
        return self.text_context_length - self.prompt_length

    def to_json(self) -> str:
        return config_to_json(self)

    @classmethod
    def from_json(cls, text: str, source: str = "config") -> ShopSegConfig:
        """Parse :meth:`to_json` output (data only); unknown fields are an error."""
        return config_from_json(cls, text, source)


FULL = ShopSegConfig()
#: same code, small everything: a 128² input (8×8 patch grid), 4 vision / 2 text blocks
TINY = ShopSegConfig(
    image_size=128,
    vision_width=64,
    vision_depth=4,
    vision_heads=2,
    out_indices=(0, 1, 2, 3),
    embed_dim=32,
    text_width=32,
    text_depth=2,
    text_heads=2,
    decoder_width=16,
    decoder_depth=1,
    decoder_heads=2,
    fpn_channels=16,
)


@dataclass(frozen=True)
class WeightsInfo:
    """Provenance of the released weights (kept apart from the architecture, like timm's PretrainedCfg)."""

    modelscope_id: str = "damo/cv_vitb16_segmentation_shop-seg"
    checkpoint: str = "pytorch_model.bin"
    vocab: str = "bpe_simple_vocab_16e6.txt.gz"
    #: vbatch's side file for non-released configs (TINY); the released directory has none
    config_file: str = "vbatch_shop_seg.json"
    # CLIP's normalisation, on [0, 1] RGB
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


WEIGHTS = WeightsInfo()
#: the names every vbatch model package's config declares
MODELSCOPE_ID, WEIGHTS_FILE = WEIGHTS.modelscope_id, WEIGHTS.checkpoint


def read_config(model_dir: Path) -> ShopSegConfig:
    """The model directory's config: :data:`FULL` unless vbatch's side file says otherwise."""
    side = Path(model_dir) / WEIGHTS.config_file
    if side.is_file():
        return ShopSegConfig.from_json(side.read_text(), source=str(side))
    return FULL


#: what the pipeline needs to know about this model (vbatch.models.registry collects it)
ENTRY = ModelEntry(
    name="shop-seg",
    module="vbatch.models.shop_seg",
    output="mask",
    modelscope_id=MODELSCOPE_ID,
    summary="product segmentation (DenseCLIP, CLIP ViT-B/16 at 1024²)",
    required_files=(WEIGHTS.checkpoint, WEIGHTS.vocab),
    checkpoint=WEIGHTS.checkpoint,
    options=("precision",),
    # GPU: when the GPU can be probed, jobs.runtime.shop_seg_gpu_batch sizes the batch from its
    # free memory; 8 is the fallback (0.52 GB of fp32 activations per image measured, 0.68 GB of
    # weights: 8 leave half of a 16 GB GPU free). CPU: 1024² inputs, 2 keep the stages flowing
    batch_cpu=2,
    batch_gpu=8,
    actor_memory_gb=4.0,
    metric_kind="mask",
    visual="outline",
    # bf16 on AMX: 3.1x the fp32 forward, mask IoU 1.000, mean 0.22 grey levels (BENCHMARKS)
    default_precision="auto",
)
