"""DenseCLIP's context decoder and the Semantic-FPN segmentation decoder (FPN neck + FPN head).

Context decoder: DenseCLIP (Rao et al., CVPR 2022), text queries attend to the image's CLIP embeddings.
FPN neck: Lin et al., CVPR 2017 ("Feature Pyramid Networks for Object Detection"); FPN head: Kirillov
et al., CVPR 2019 ("Panoptic Feature Pyramid Networks"), as in mmsegmentation. Reference
implementation: ModelScope ``models/cv/shop_segmentation/{models,neck_fpn,head_fpn}.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn


class QKVAttention(nn.Module):
    """Multi-head attention with separate bias-free q/k/v projections and a biased output projection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """Args: q: (B, N, D); kv: (B, M, D). Returns: (B, N, D)."""
        b, n, d = q.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, -1, self.heads, d // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            split(self.q_proj(q)), split(self.k_proj(kv)), split(self.v_proj(kv))
        )
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class ContextDecoderLayer(nn.Module):
    """Pre-norm transformer decoder layer: self-attention, cross-attention to memory, MLP (GELU)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.self_attn = QKVAttention(dim, heads)
        self.cross_attn = QKVAttention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * 4, act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, K, D) queries; memory: (B, M, D). Returns: (B, K, D)."""
        h = self.norm1(x)
        x = x + self.self_attn(h, h)
        x = x + self.cross_attn(self.norm2(x), memory)
        return x + self.mlp(self.norm3(x))


class ContextDecoder(nn.Module):
    """Updates the text embeddings of one image from its visual context (DenseCLIP's post-model prompting).

    Args:
        embed_dim: CLIP embedding size E.
        width: decoder width D.
        heads: attention heads.
        depth: decoder layers.
    """

    def __init__(self, embed_dim: int, width: int, heads: int, depth: int) -> None:
        super().__init__()
        self.memory_proj = nn.Sequential(
            nn.LayerNorm(embed_dim), nn.Linear(embed_dim, width), nn.LayerNorm(width)
        )
        self.text_proj = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, width))
        self.layers = nn.ModuleList(ContextDecoderLayer(width, heads) for _ in range(depth))
        self.out_proj = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, embed_dim))

    def forward(self, text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """
        Args:
            text: (B, K, E) the K prompt embeddings, per image.
            visual: (B, 1 + h·w, E) global then dense image embeddings.

        Returns:
            (B, K, E) the text update (scaled by the model's gamma before it is added).
        """
        memory = self.memory_proj(visual)
        x = self.text_proj(text)
        for layer in self.layers:
            x = layer(x, memory)
        return self.out_proj(x)


class FPNNeck(nn.Module):
    """FPN without norms or activations: 1×1 laterals, nearest top-down sum, 3×3 output convs.

    Args:
        in_channels: channels of the 4 input levels (finest first).
        channels: output channels of every level.
    """

    def __init__(self, in_channels: tuple[int, ...], channels: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.smooth = nn.ModuleList(
            nn.Conv2d(channels, channels, 3, padding=1) for _ in in_channels
        )

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Args: feats: per level (B, C_i, H_i, W_i). Returns: per level (B, channels, H_i, W_i)."""
        lat = [conv(f) for conv, f in zip(self.lateral, feats, strict=True)]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + F.interpolate(
                lat[i], size=lat[i - 1].shape[2:], mode="nearest"
            )
        return [conv(x) for conv, x in zip(self.smooth, lat, strict=True)]


class ConvBNReLU(nn.Module):
    """3×3 conv (no bias) → BatchNorm → ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class Upsample2x(nn.Module):
    """Bilinear ×2 (align_corners=False), by output size as mmseg's ``Upsample`` does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(
            x, size=(2 * x.shape[-2], 2 * x.shape[-1]), mode="bilinear", align_corners=False
        )


class FPNHead(nn.Module):
    """Semantic-FPN head: each level is brought to stride 4 by conv-BN-ReLU + ×2 steps, summed, classified.

    Args:
        channels: input/hidden channels.
        num_classes: output classes.
        strides: strides of the input levels (finest first).
    """

    def __init__(
        self, channels: int, num_classes: int, strides: tuple[int, ...] = (4, 8, 16, 32)
    ) -> None:
        super().__init__()
        self.scale_heads = nn.ModuleList()
        for stride in strides:
            steps = max(1, int(math.log2(stride) - math.log2(strides[0])))
            layers: list[nn.Module] = []
            for _ in range(steps):
                layers.append(ConvBNReLU(channels))
                if stride != strides[0]:
                    layers.append(Upsample2x())
            self.scale_heads.append(nn.Sequential(*layers))
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Args: feats: per level (B, channels, H_i, W_i). Returns: (B, num_classes, H_0, W_0) logits."""
        out = self.scale_heads[0](feats[0])
        for head, f in zip(self.scale_heads[1:], feats[1:], strict=True):
            y = head(f)
            if y.shape[2:] != out.shape[2:]:  # a same-size bilinear resize is the identity
                y = F.interpolate(y, size=out.shape[2:], mode="bilinear", align_corners=False)
            out = out + y
        return self.classifier(out)
