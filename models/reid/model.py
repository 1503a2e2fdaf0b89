"""PASS ViT-B/16 person re-identification network: a TransReID ViT with one class and three part tokens.

Paper: Zhu et al., "PASS: Part-Aware Self-Supervised Pre-Training for Person Re-Identification",
ECCV 2022 (arXiv:2203.03931), fine-tuned with the TransReID recipe (He et al., "TransReID:
Transformer-based Object Re-Identification", ICCV 2021).

Reference: ModelScope 1.40.2 ``models/cv/image_reid_person/pass_model.py`` and ``transreid_model.py``
(adopted from CASIA-IVA-Lab/PASS-reID), driven by ``pipelines/cv/image_reid_person_pipeline.py``
(model id ``damo/cv_passvitb_image-reid-person_market``). Written anew on timm's ViT blocks.

The network, as the reference runs it at inference:

* patch embedding: a 16×16 convolution with a configurable (possibly overlapping) stride;
* four learned tokens — class, part 1, part 2, part 3 — prepended to the patches, each with its own
  learned position next to the patches' position embedding (no interpolation: the input size is fixed
  by the configuration);
* 12 pre-norm ViT blocks (LayerNorm eps 1e-6, exact GELU, qkv bias), a final LayerNorm;
* the four token outputs are fused — ``cat(cls, (p1 + p2 + p3) / 3)`` (1536-d) or
  ``(cls + (p1 + p2 + p3) / 3) / 2`` (768-d) — and optionally passed through a BatchNorm "BN neck"
  (one BN over the fused vector, or one BN per token before fusing when ``multi_neck``);
  ``neck_feat`` picks the vector before or after that neck.

Camera/view side information (SIE), GeM pooling, the convolutional stem, dropout, drop-path and the
ID classifier are training-only or unused by the reference pipeline; see :mod:`vbatch.models.reid.convert`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from timm.models.vision_transformer import Block
from torch import nn

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


class LayerNorm6(nn.LayerNorm):
    """LayerNorm with eps 1e-6, the reference's value (PyTorch's default is 1e-5)."""

    def __init__(self, dim: int, **kwargs: object) -> None:
        super().__init__(dim, eps=1e-6, **kwargs)  # type: ignore[arg-type]


class PartTokenViT(nn.Module):
    """TransReID backbone: ViT over (possibly overlapping) patches with a class and three part tokens."""

    def __init__(self, cfg: ReidConfig) -> None:
        super().__init__()
        dim = cfg.vit.embed_dim
        self.image_size = cfg.image_size
        self.patch_proj = nn.Conv2d(3, dim, kernel_size=PATCH_SIZE, stride=cfg.stride)
        # [cls, part1, part2, part3] and their positions; the patches' positions follow in pos_embed
        self.tokens = nn.Parameter(torch.zeros(1, NUM_TOKENS, dim))
        self.token_pos = nn.Parameter(torch.zeros(1, NUM_TOKENS, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, dim))
        self.blocks = nn.ModuleList(
            Block(
                dim,
                cfg.vit.num_heads,
                mlp_ratio=cfg.vit.mlp_ratio,
                qkv_bias=True,
                norm_layer=LayerNorm6,
            )
            for _ in range(cfg.vit.depth)
        )
        self.norm = LayerNorm6(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, 3, H, W) float, normalised. Returns: (B, 4, D) final-norm outputs of the
        [cls, part1, part2, part3] tokens."""
        # (B, N, D), patches in row-major order over the grid, as the reference flattens them
        x = self.patch_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.tokens.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + torch.cat((self.token_pos, self.pos_embed), dim=1)
        for blk in self.blocks:
            x = blk(x)
        # LayerNorm is per token: normalising only the four tokens that are used is the same
        return self.norm(x[:, :NUM_TOKENS])


class FusionNeck(nn.Module):
    """Fuses the four token features into the embedding, before or after BatchNorm "BN necks"."""

    def __init__(self, cfg: ReidConfig) -> None:
        super().__init__()
        self.fusion = cfg.feat_fusion
        self.after = cfg.neck_feat == "after"
        dim = cfg.vit.embed_dim
        # one BN over the fused vector, or (multi-neck) one over the cls feature plus one per part token
        self.bn = nn.BatchNorm1d(dim if cfg.multi_neck else cfg.embed_dim)
        self.part_bns = (
            nn.ModuleList(nn.BatchNorm1d(dim) for _ in range(3)) if cfg.multi_neck else None
        )

    def _fuse(
        self, cls: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, p3: torch.Tensor
    ) -> torch.Tensor:
        # the parts are averaged as p/3 summed (not (p1+p2+p3)/3), the reference's order of operations
        local = p1 / 3.0 + p2 / 3.0 + p3 / 3.0
        if self.fusion == "cat":
            return torch.cat((cls, local), dim=1)
        return (cls + local) / 2.0

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Args: tokens: (B, 4, D) [cls, part1, part2, part3]. Returns: (B, E) with E = 2·D ("cat") or D."""
        cls, p1, p2, p3 = tokens.unbind(1)
        if not self.after:
            return self._fuse(cls, p1, p2, p3)
        if self.part_bns is None:
            return self.bn(self._fuse(cls, p1, p2, p3))
        bn1, bn2, bn3 = self.part_bns
        return self._fuse(self.bn(cls), bn1(p1), bn2(p2), bn3(p3))


class ReidNet(nn.Module):
    """Image → re-ID embedding (not L2-normalised), with the pixel normalisation inside so that uint8
    crosses to the device."""

    pixel_mean: torch.Tensor
    pixel_std: torch.Tensor

    def __init__(self, cfg: ReidConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = PartTokenViT(cfg)
        self.neck = FusionNeck(cfg)
        # not persistent: these come from configuration.json, not from the checkpoint
        self.register_buffer(
            "pixel_mean", torch.tensor(cfg.pixel_mean).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "pixel_std", torch.tensor(cfg.pixel_std).view(1, 3, 1, 1), persistent=False
        )

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Args: images: (B, 3, H, W) uint8 RGB. Returns: (B, 3, H, W) float32, ``(x/255 - mean) / std``
        as torchvision's ``ToTensor`` + ``Normalize`` compute it."""
        if images.dtype != torch.uint8:
            raise TypeError(f"images must be uint8, got {images.dtype}")
        x = images.float().div(255)
        return (x - self.pixel_mean) / self.pixel_std

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, 3, H, W) normalised float at the configured size. Returns: (B, E)."""
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != self.cfg.image_size:
            raise ValueError(
                f"expected input (B, 3, {self.cfg.image_size[0]}, {self.cfg.image_size[1]}), "
                f"got {tuple(x.shape)}"
            )
        return self.neck(self.backbone(x))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Args: images: (B, 3, H, W) uint8 RGB at the configured (H, W). Returns: (B, E) float."""
        return self.embed(self.normalize(images))
