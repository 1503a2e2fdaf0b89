"""DenseCLIP's CLIP encoders: a ViT image encoder with a feature pyramid, and a prompt-learning text encoder.

DenseCLIP (Rao et al., CVPR 2022, "DenseCLIP: Language-Guided Dense Prediction with Context-Aware
Prompting"; github.com/raoyongming/DenseCLIP) on OpenAI CLIP (Radford et al., 2021). Reference
implementation: ModelScope ``models/cv/shop_segmentation/models.py`` (``CLIPVisionTransformer``,
``CLIPTextContextEncoder``). Transformer blocks are timm's pre-norm ``Block`` with QuickGELU, whose
fused attention (``scaled_dot_product_attention``) never materialises the 4097×4097 attention map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import QuickGELU
from timm.models.vision_transformer import Block
from torch import nn


def clip_block(width: int, heads: int) -> Block:
    """CLIP's residual attention block: LN (eps 1e-5) → MHA (biased qkv) → LN → MLP ×4 with QuickGELU."""
    return Block(
        width, heads, mlp_ratio=4.0, qkv_bias=True, act_layer=QuickGELU, norm_layer=nn.LayerNorm
    )


class ViTPyramid(nn.Module):
    """CLIP ViT-B/16 returning a 4-level feature pyramid and CLIP-space dense embeddings.

    Args:
        image_size: S, the (square) input size the positional embeddings are made for.
        patch_size: P (16; DenseCLIP's pyramid layout below is the one for P = 16).
        width: token width C.
        depth: number of blocks.
        heads: attention heads.
        embed_dim: CLIP embedding size E (the ``proj`` output).
        out_indices: the 4 blocks whose patch tokens feed the pyramid.
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        width: int,
        depth: int,
        heads: int,
        embed_dim: int,
        out_indices: tuple[int, int, int, int],
    ) -> None:
        super().__init__()
        if patch_size != 16:
            raise ValueError(
                f"DenseCLIP's ViT pyramid is built for patch size 16, got {patch_size}"
            )
        if len(out_indices) != 4 or len(set(out_indices)) != 4 or max(out_indices) >= depth:
            raise ValueError(
                f"out_indices must be 4 distinct blocks < depth={depth}, got {out_indices}"
            )
        self.grid = image_size // patch_size
        self.out_indices = tuple(out_indices)
        self.patch_embed = nn.Conv2d(3, width, patch_size, stride=patch_size, bias=False)
        self.cls_token = nn.Parameter(torch.zeros(width))
        self.pos_embed = nn.Parameter(torch.zeros(self.grid * self.grid + 1, width))
        self.norm_pre = nn.LayerNorm(width)
        self.blocks = nn.ModuleList(clip_block(width, heads) for _ in range(depth))
        self.norm_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, embed_dim))
        # strides 4, 8, 16, 32 from the stride-16 tokens (BEiT/ViTDet-style simple pyramid)
        self.up4 = nn.Sequential(
            nn.GroupNorm(1, width),
            nn.ConvTranspose2d(width, width, 2, stride=2),
            nn.BatchNorm2d(width),
            nn.GELU(),
            nn.ConvTranspose2d(width, width, 2, stride=2),
        )
        self.up2 = nn.Sequential(
            nn.GroupNorm(1, width), nn.ConvTranspose2d(width, width, 2, stride=2)
        )
        self.same = nn.GroupNorm(1, width)
        self.down2 = nn.Sequential(nn.GroupNorm(1, width), nn.MaxPool2d(2, stride=2))

    def _pos_embed(self, h: int, w: int) -> torch.Tensor:
        """(1 + h·w, C) positional embeddings; the grid is resized bilinearly if (h, w) differs."""
        cls_pos, grid_pos = self.pos_embed[:1], self.pos_embed[1:]
        if (h, w) != (self.grid, self.grid):
            c = grid_pos.shape[-1]
            grid_pos = grid_pos.reshape(1, self.grid, self.grid, c).permute(0, 3, 1, 2)
            grid_pos = F.interpolate(grid_pos, size=(h, w), mode="bilinear", align_corners=False)
            grid_pos = grid_pos.reshape(c, h * w).t()
        # DenseCLIP adds the class embedding to the class position, and the class token *is* the class
        # embedding: the class token carries it twice. The released weights were trained that way.
        return torch.cat([cls_pos + self.cls_token, grid_pos], dim=0)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """
        Args:
            x: (B, 3, S, S) normalised images.

        Returns:
            ``pyramid``: 4 maps (B, C, S/4, S/4), (B, C, S/8, S/8), (B, C, S/16, S/16), (B, C, S/32, S/32);
            ``global_embed``: (B, E), the class token in CLIP space;
            ``dense_embed``: (B, E, S/16, S/16), the patch tokens in CLIP space.
        """
        x = self.patch_embed(x)
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.to(x.dtype).expand(b, 1, c), x], dim=1)
        x = self.norm_pre(x + self._pos_embed(h, w).to(x.dtype))
        taps = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.out_indices:
                taps.append(x[:, 1:].transpose(1, 2).reshape(b, c, h, w))
        pyramid = [
            op(t) for op, t in zip((self.up4, self.up2, self.same, self.down2), taps, strict=True)
        ]
        x = self.norm_post(x) @ self.proj.to(x.dtype)
        dense = x[:, 1:].transpose(1, 2).reshape(b, -1, h, w)
        return pyramid, x[:, 0], dense


class PromptTextEncoder(nn.Module):
    """CLIP's text transformer with N learned context tokens inserted after the start token (CoOp-style).

    Args:
        vocab_size: token vocabulary size.
        context_length: total sequence length T = prompt tokens L + context tokens N.
        width: token width D.
        depth: blocks.
        heads: attention heads.
        embed_dim: CLIP embedding size E.
    """

    def __init__(
        self,
        vocab_size: int,
        context_length: int,
        width: int,
        depth: int,
        heads: int,
        embed_dim: int,
    ) -> None:
        super().__init__()
        self.context_length = context_length
        self.token_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(context_length, width))
        self.blocks = nn.ModuleList(clip_block(width, heads) for _ in range(depth))
        self.norm_final = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, embed_dim))

    def forward(self, tokens: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """
        Args:
            tokens: (K, L) int64 ``[SOT, ids…, EOT, 0…]``; EOT has the largest id.
            context: (1, N, D) learned context, with L + N = T.

        Returns:
            (K, E) the EOT token's features, projected.
        """
        k, length = tokens.shape
        n_ctx = context.shape[1]
        if length + n_ctx != self.context_length:
            raise ValueError(
                f"{length} tokens + {n_ctx} context ≠ context length {self.context_length}"
            )
        x = self.token_embed(tokens)
        x = torch.cat([x[:, :1], context.expand(k, -1, -1).to(x.dtype), x[:, 1:]], dim=1)
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x, is_causal=True)
        x = self.norm_final(x)
        eot = tokens.argmax(dim=-1) + n_ctx
        return x[torch.arange(k, device=x.device), eot] @ self.proj
