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

import torch
from timm.models.vision_transformer import Block
from torch import nn

from vbatch.models.reid.config import NUM_TOKENS, PATCH_SIZE, ReidConfig

logger = logging.getLogger(__name__)


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
