"""MTTR's instance decoding: an FPN-like spatial decoder and the per-query heads.

Botach et al., CVPR 2022 (MTTR), following ModelScope 1.40.2's ``utils/segmentation.py``
(``FPNSpatialDecoder``) and ``utils/mttr.py`` (heads). The spatial decoder turns the encoder's video
memory (at the last Swin stage's stride, 16) plus the backbone's finer
stages into ``mask_kernels_dim``-channel maps at stride 4; every object query predicts a dynamic
1x1 kernel (2-layer MLP) applied to those maps, and a 2-way "is referred" logit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SpatialDecoder(nn.Module):
    """FPN decoder: (conv3x3 -> GroupNorm(8) -> ReLU) stages, widths d, d/2, d/4, d/8, fused top-down
    with 1x1 adapters of the backbone's stage outputs (coarse to fine) by nearest upsampling."""

    def __init__(self, d_model: int, fpn_dims: tuple[int, ...], out_dim: int) -> None:
        """
        Args:
            d_model: channels of the encoder's video memory.
            fpn_dims: channels of the backbone features fused in, coarse to fine (two of them: the
                reference's third level exists only for four-stage backbones, which MTTR's Swin is not).
        """
        super().__init__()
        if len(fpn_dims) != 2:
            raise ValueError(f"expected two backbone levels to fuse, got {len(fpn_dims)}")
        widths = [d_model, d_model, d_model // 2, d_model // 4, d_model // 8]
        self.convs = nn.ModuleList(
            nn.Conv2d(widths[i], widths[i + 1], 3, padding=1) for i in range(4)
        )
        self.norms = nn.ModuleList(nn.GroupNorm(8, widths[i + 1]) for i in range(4))
        self.adapters = nn.ModuleList(nn.Conv2d(fpn_dims[i], widths[i + 2], 1) for i in range(2))
        self.out_conv = nn.Conv2d(widths[4], out_dim, 3, padding=1)

    def _block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norms[i](self.convs[i](x)))

    def adapt(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """The 1x1 adapters alone (query-independent). Args: features: coarse to fine, (T, C_i, H_i, W_i)."""
        return [adapter(f) for adapter, f in zip(self.adapters, features, strict=True)]

    def forward(
        self, memory: torch.Tensor, adapted: list[torch.Tensor], repeats: int = 1
    ) -> torch.Tensor:
        """
        Args:
            memory: (T·B, d_model, h, w) video memory, frame-major (index t·B + b).
            adapted: :meth:`adapt`'s outputs, (T, C, H_i, W_i), shared by the B queries.
            repeats: B, the number of queries per frame in ``memory``.

        Returns: (T·B, out_dim, H_fine, W_fine).
        """
        x = self._block(1, self._block(0, memory))
        for i, lateral in enumerate(adapted):
            lateral = lateral.repeat_interleave(repeats, dim=0)
            x = lateral + F.interpolate(x, size=lateral.shape[-2:], mode="nearest")
            x = self._block(i + 2, x)
        return self.out_conv(x)


class KernelHead(nn.Module):
    """2-layer MLP with ReLU: query embedding -> dynamic mask kernel."""

    def __init__(self, d_model: int, out_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(d_model, d_model), nn.Linear(d_model, out_dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[1](F.relu(self.layers[0](x)))
