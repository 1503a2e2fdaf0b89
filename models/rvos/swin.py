"""Video Swin Transformer backbone as MTTR uses it.

Liu et al., "Video Swin Transformer" (CVPR 2022, arXiv:2106.13230), modified by MTTR (Botach et al.,
"End-to-End Referring Video Object Segmentation with Multimodal Transformers", CVPR 2022): patches of
(1, 4, 4) so that every frame keeps its own feature map, only the first three stages, and the
features of every stage taken *before* its patch merging. Behaviour follows ModelScope 1.40.2's
``models/cv/referring_video_object_segmentation/utils/swin_transformer.py`` and ``backbone.py``,
including two details a port must keep:

* where a clip is shorter than the window along an axis, the window shrinks to the clip and the
  shift along that axis is dropped, and the relative-position bias of the smaller window is read
  from the top-left ``N x N`` corner of the full window's index table (not re-indexed);
* tokens padded to a multiple of the window are zeros *after* ``norm1`` and take part in attention
  as keys; the shifted-window mask uses -100, not -inf.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

from vbatch.models.rvos.config import SwinConfig

logger = logging.getLogger(__name__)

#: windows attended to per chunk; bounds the (windows, heads, N, N) attention memory, same result
ATTENTION_CHUNK = 128


def effective_window(
    size: tuple[int, int, int], window: tuple[int, int, int], shift: tuple[int, int, int]
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """The window and shift actually used on a (D, H, W) token grid: an axis no longer than the
    window gets a window of its own length and no shift."""
    ws, ss = list(window), list(shift)
    for i in range(3):
        if size[i] <= window[i]:
            ws[i], ss[i] = size[i], 0
    return (ws[0], ws[1], ws[2]), (ss[0], ss[1], ss[2])


def relative_position_index(window: tuple[int, int, int]) -> torch.Tensor:
    """(N, N) index into the bias table for every pair of tokens of a (Wd, Wh, Ww) window, N = Wd·Wh·Ww."""
    wd, wh, ww = window
    grid = torch.stack(
        torch.meshgrid(torch.arange(wd), torch.arange(wh), torch.arange(ww), indexing="ij")
    ).flatten(1)  # (3, N), tokens in (d, h, w) order
    rel = grid[:, :, None] - grid[:, None, :]  # (3, N, N)
    return (
        (rel[0] + wd - 1) * (2 * wh - 1) * (2 * ww - 1)
        + (rel[1] + wh - 1) * (2 * ww - 1)
        + (rel[2] + ww - 1)
    )


def partition(x: torch.Tensor, window: tuple[int, int, int]) -> torch.Tensor:
    """(B, D, H, W, C) with D, H, W multiples of the window -> (B, nW, Wd·Wh·Ww, C)."""
    b, d, h, w, c = x.shape
    wd, wh, ww = window
    x = x.view(b, d // wd, wd, h // wh, wh, w // ww, ww, c)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, -1, wd * wh * ww, c)


def unpartition(
    windows: torch.Tensor, window: tuple[int, int, int], size: tuple[int, int, int]
) -> torch.Tensor:
    """Inverse of :func:`partition`: (B, nW, N, C) -> (B, D, H, W, C)."""
    b, _, _, c = windows.shape
    d, h, w = size
    wd, wh, ww = window
    x = windows.view(b, d // wd, h // wh, w // ww, wd, wh, ww, c)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, d, h, w, c)


def shift_mask(
    size: tuple[int, int, int],
    window: tuple[int, int, int],
    shift: tuple[int, int, int],
    device: torch.device,
) -> torch.Tensor:
    """(nW, N, N) additive mask for shifted windows: -100 between tokens from different regions."""

    def regions(n: int, w: int, s: int) -> torch.Tensor:
        # after the cyclic shift, [0, n-w), [n-w, n-s) and [n-s, n) came from different places
        r = torch.zeros(n, device=device)
        if s > 0:
            r[n - w : n - s] = 1
            r[n - s :] = 2
        return r

    rd, rh, rw = (regions(n, w, s) for n, w, s in zip(size, window, shift, strict=True))
    label = rd[:, None, None] * 9 + rh[None, :, None] * 3 + rw[None, None, :]
    label = partition(label[None, ..., None], window)[0, ..., 0]  # (nW, N)
    diff = label[:, None, :] - label[:, :, None]
    return torch.where(diff != 0, -100.0, 0.0)


class WindowAttention3D(nn.Module):
    """Multi-head self-attention inside 3D windows, with a learned relative-position bias."""

    relative_position_index: torch.Tensor

    def __init__(self, dim: int, num_heads: int, window: tuple[int, int, int]) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        wd, wh, ww = window
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * wd - 1) * (2 * wh - 1) * (2 * ww - 1), num_heads)
        )
        # deterministic: rebuilt here, never loaded (the converter drops ModelScope's copy)
        self.register_buffer(
            "relative_position_index", relative_position_index(window), persistent=False
        )
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Args: x: (B, nW, N, C) windows; mask: (nW, N, N) additive or None. Returns (B, nW, N, C)."""
        b, nw, n, c = x.shape
        # the reference reads a smaller window's bias from the corner of the full window's table
        index = self.relative_position_index[:n, :n].reshape(-1)
        bias = (
            self.relative_position_bias_table[index].view(n, n, -1).permute(2, 0, 1)
        )  # (heads, N, N)
        out = torch.empty_like(x)
        for lo in range(0, nw, ATTENTION_CHUNK):
            hi = min(lo + ATTENTION_CHUNK, nw)
            qkv = self.qkv(x[:, lo:hi]).view(b, hi - lo, n, 3, self.num_heads, c // self.num_heads)
            q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)  # each (B, w, heads, N, hd)
            att_bias = bias if mask is None else bias + mask[lo:hi, None]  # (w, heads, N, N)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=att_bias, scale=self.scale)
            out[:, lo:hi] = self.proj(y.transpose(2, 3).reshape(b, hi - lo, n, c))
        return out


class SwinBlock3D(nn.Module):
    """One (shifted-)window attention block, post-residual, pre-norm."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window: tuple[int, int, int],
        shifted: bool,
        mlp_ratio: float,
    ) -> None:
        super().__init__()
        self.window = window
        self.shift: tuple[int, int, int] = (
            (window[0] // 2, window[1] // 2, window[2] // 2) if shifted else (0, 0, 0)
        )
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention3D(dim, num_heads, window)
        self.norm2 = nn.LayerNorm(dim)
        # timm's Mlp: fc1 → exact GELU → fc2 (its dropouts are identities at p=0), the reference's keys
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        _, d, h, w, _ = x.shape
        window, shift = effective_window((d, h, w), self.window, self.shift)
        x = self.norm1(x)
        pads = [(-n) % wn for n, wn in zip((d, h, w), window, strict=True)]
        x = F.pad(x, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))  # zero tokens after the norm
        padded = (d + pads[0], h + pads[1], w + pads[2])
        shifted = any(s > 0 for s in shift)
        if shifted:
            x = torch.roll(x, shifts=tuple(-s for s in shift), dims=(1, 2, 3))
            mask = shift_mask(padded, window, shift, x.device).to(x.dtype)
        else:
            mask = None
        x = unpartition(self.attn(partition(x, window), mask), window, padded)
        if shifted:
            x = torch.roll(x, shifts=shift, dims=(1, 2, 3))
        return x[:, :d, :h, :w].contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, D, H, W, C). Returns the same shape."""
        x = x + self._attend(x)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2x2 spatial merging (no temporal merging): (B, D, H, W, C) -> (B, D, ceil(H/2), ceil(W/2), 2C)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2:4]
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat(
            [x[:, :, 0::2, 0::2], x[:, :, 1::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 1::2]], -1
        )
        return self.reduction(self.norm(x))


class PatchEmbed3D(nn.Module):
    """Non-overlapping (pt, ph, pw) patches -> embed_dim, then LayerNorm; pads the clip at the end."""

    def __init__(self, patch: tuple[int, int, int], dim: int) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv3d(3, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, 3, D, H, W). Returns (B, D', H', W', C) channels-last."""
        d, h, w = x.shape[2:]
        pd, ph, pw = ((-n) % p for n, p in zip((d, h, w), self.patch, strict=True))
        if pd or ph or pw:
            x = F.pad(x, (0, pw, 0, ph, 0, pd))
        return self.norm(self.proj(x).permute(0, 2, 3, 4, 1))


class SwinStage(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, cfg: SwinConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock3D(
                dim, num_heads, cfg.window_size, shifted=i % 2 == 1, mlp_ratio=cfg.mlp_ratio
            )
            for i in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x


class VideoSwinBackbone(nn.Module):
    """Per-frame multi-scale features of one clip.

    ``stages[i]`` works at stride ``4 * 2**i`` with ``embed_dim * 2**i`` channels; ``merges[i]``
    (patch merging) links stage i to stage i+1.
    """

    def __init__(self, cfg: SwinConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed3D(cfg.patch_size, cfg.embed_dim)
        dims = cfg.channels
        self.stages = nn.ModuleList(
            SwinStage(dim, depth, heads, cfg)
            for dim, depth, heads in zip(dims, cfg.depths, cfg.num_heads, strict=True)
        )
        self.merges = nn.ModuleList(PatchMerging(dim) for dim in dims[:-1])

    def forward(self, frames: torch.Tensor) -> list[torch.Tensor]:
        """Args: frames: (T, 3, H, W) normalised float, one clip.

        Returns: one (T, C_i, ceil(H / 4·2^i), ceil(W / 4·2^i)) map per stage, finest first.
        """
        x = self.patch_embed(frames.transpose(0, 1)[None])  # (1, T, H/4, W/4, C)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            outs.append(x[0].permute(0, 3, 1, 2))
            if i < len(self.merges):
                x = self.merges[i](x)
        return outs
