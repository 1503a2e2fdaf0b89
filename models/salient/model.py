"""SENet: salient-object detection with a Res2Net-v1b backbone and an edge/area-guided decoder.

Backbone: Res2Net-v1b-50 26w×4s (Gao et al., "Res2Net: A New Multi-scale Backbone Architecture",
TPAMI 2019), built from timm's ``Bottle2neck``/``ResNet`` (deep stem, average-pool downsampling =
timm's ``res2net50d``). Decoder: ASPP (Chen et al., DeepLab v3) and CBAM (Woo et al., ECCV 2018) on
the two deepest stages, auxiliary edge and area maps, edge-guided structure enhancement of the
shallow stages and area-guided fusion. Reference implementation: ModelScope 1.40.2
``models/cv/salient_detection/models/{senet,modules,utils}.py`` (model id
``damo/cv_res2net_salient-detection``). Module names follow ModelScope's so that the decoder's keys
load unchanged; the backbone lives under ``backbone.`` (see ``convert.py``).

Only the first (finest, 1/4-scale) map is computed: ModelScope's pipeline discards the other three,
and the ``alayer``/``arlayer`` branches of its ``ABlock`` are never called (``convert.py`` drops
their weights by name).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.models.res2net import Bottle2neck
from timm.models.resnet import ResNet
from torch import nn

from vbatch.models.precision import fp32_island
from vbatch.models.salient.config import (
    SENET,
    U2NET,
    SalientConfigError,
    SENetConfig,
    U2NetConfig,
    Variant,
)
from vbatch.models.salient.u2net import U2Net


class ConvBNReLU(nn.Module):
    """conv (no bias) → BN → ReLU, under ``.block`` as in the checkpoint."""

    def __init__(
        self,
        cin: int,
        cout: int,
        k: int | tuple[int, int] = 3,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1×1, 3×3 at dilation 2/5/7 and global-pool branches, fused 3×3."""

    def __init__(self, cin: int, cout: int, mid: int = 128) -> None:
        super().__init__()
        self.conv1 = ConvBNReLU(cin, mid, 1)
        self.conv2 = ConvBNReLU(cin, mid, 3, padding=2, dilation=2)
        self.conv3 = ConvBNReLU(cin, mid, 3, padding=5, dilation=5)
        self.conv4 = ConvBNReLU(cin, mid, 3, padding=7, dilation=7)
        self.conv5 = ConvBNReLU(cin, mid, 1)  # on the globally pooled features
        self.fuse = ConvBNReLU(5 * mid, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, cin, h, w) → (B, cout, h, w)."""
        h, w = x.shape[-2:]
        pooled = self.conv5(x.mean(dim=(2, 3), keepdim=True)).expand(-1, -1, h, w)
        return self.fuse(
            torch.cat((self.conv1(x), self.conv2(x), self.conv3(x), self.conv4(x), pooled), 1)
        )


class ChannelAttention(nn.Module):
    def __init__(self, ch: int, ratio: int = 16) -> None:
        super().__init__()
        self.fc = nn.Sequential(
            nn.Conv2d(ch, ch // ratio, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(ch // ratio, ch, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, h, w) → channel weights (B, C, 1, 1) in (0, 1)."""
        avg = self.fc(x.mean(dim=(2, 3), keepdim=True))
        mx = self.fc(x.amax(dim=(2, 3), keepdim=True))
        return torch.sigmoid(avg + mx)


class SpatialAttention(nn.Module):
    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, h, w) → spatial weights (B, 1, h, w) from [mean, max] over channels."""
        stats = torch.cat((x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)), 1)
        return torch.sigmoid(self.conv1(stats))


class CBAM(nn.Module):
    """Convolutional block attention: channel attention, then spatial attention."""

    def __init__(self, ch: int, kernel_size: int = 7) -> None:
        super().__init__()
        self.calayer = ChannelAttention(ch)
        self.saLayer = SpatialAttention(kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.calayer(x) * x
        return self.saLayer(x) * x


def _aux_head(ch: int) -> nn.Sequential:
    """The 2·ch → ch → ch → 1 head shared by the edge and area layers (3×3, 3×3, 1×1)."""
    return nn.Sequential(
        nn.Conv2d(2 * ch, ch, 3, 1, 1),
        nn.BatchNorm2d(ch),
        nn.ReLU(inplace=True),
        nn.Conv2d(ch, ch, 3, 1, 1),
        nn.BatchNorm2d(ch),
        nn.ReLU(inplace=True),
        nn.Conv2d(ch, 1, 1),
    )


def _proj(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class EdgeLayer(nn.Module):
    """Edge logits at the low-level (1/4) resolution from low-level + upsampled high-level features."""

    def __init__(self, high_ch: int, ch: int) -> None:
        super().__init__()
        self.lbody = _proj(ch, ch)
        self.hbody = _proj(high_ch, ch)
        self.bodye = _aux_head(ch)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        """low: (B, ch, H4, W4), high: (B, high_ch, H16, W16) → (B, 1, H4, W4) logits."""
        hi = F.interpolate(
            self.hbody(high), size=low.shape[-2:], mode="bilinear", align_corners=True
        )
        return self.bodye(torch.cat((self.lbody(low), hi), 1))


class AreaLayer(nn.Module):
    """Coarse saliency ("area") logits at the high-level (1/16) resolution."""

    def __init__(self, high_ch: int, ch: int) -> None:
        super().__init__()
        self.lbody = _proj(ch, ch)
        self.hbody = _proj(high_ch, ch)
        self.body = _aux_head(ch)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        """low: (B, ch, H4, W4), high: (B, high_ch, H16, W16) → (B, 1, H16, W16) logits."""
        lo = F.interpolate(
            self.lbody(low), size=high.shape[-2:], mode="bilinear", align_corners=True
        )
        return self.body(torch.cat((lo, self.hbody(high)), 1))


class EBlock(nn.Module):
    """Edge-conditioned block: conv on [x, edge], then spatial gating from [max, mean] over channels."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.elayer = nn.Sequential(
            ConvBNReLU(cin + 1, cout, 3, padding=1), ConvBNReLU(cout, cout, 1)
        )
        self.salayer = nn.Sequential(
            nn.Conv2d(2, 1, 3, 1, 1, bias=False), nn.BatchNorm2d(1, momentum=0.01), nn.Sigmoid()
        )

    def forward(self, x: torch.Tensor, edge: torch.Tensor) -> torch.Tensor:
        ex = self.elayer(torch.cat((x, edge), 1))
        gate = self.salayer(
            torch.cat((ex.amax(dim=1, keepdim=True), ex.mean(dim=1, keepdim=True)), 1)
        )
        return ex * gate


class StructureE(nn.Module):
    """Structure enhancement: channel groups of ``group`` each go through an :class:`EBlock`."""

    def __init__(self, cin: int, cout: int, group: int) -> None:
        super().__init__()
        self.groups = cin // group
        self.emlayes = nn.ModuleList(EBlock(group, cout // self.groups) for _ in range(self.groups))
        self.body = nn.Sequential(ConvBNReLU(cout, cout, 3, padding=1), ConvBNReLU(cout, cout, 1))

    def forward(self, x: torch.Tensor, edge: torch.Tensor) -> torch.Tensor:
        """x: (B, cin, h, w), edge: (B, 1, h', w') probabilities → (B, cout, h, w)."""
        if edge.shape[-2:] != x.shape[-2:]:
            edge = F.interpolate(edge, size=x.shape[-2:], mode="bilinear", align_corners=False)
        parts = torch.chunk(x, self.groups, dim=1)
        return self.body(
            torch.cat([blk(p, edge) for blk, p in zip(self.emlayes, parts, strict=True)], 1)
        )


class ABlock(nn.Module):
    """Area-guided split: [x·a, x·(1−a)] fused by a 1×1 conv.

    ModelScope's block also builds two k×k branches (``alayer``, ``arlayer``) that its forward never
    calls; they are not built here and their checkpoint weights are dropped in ``convert.py``.
    """

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.fusion = ConvBNReLU(2 * ch, ch, 1)

    def forward(self, x: torch.Tensor, area: torch.Tensor) -> torch.Tensor:
        return self.fusion(torch.cat((x * area, x * (1 - area)), 1))


class AMFusion(nn.Module):
    """Area-map fusion decoder step: upsample high-level ×2, add low-level, gate by the area map."""

    def __init__(self, cin: int, cout: int, group: int) -> None:
        super().__init__()
        self.conv_up = ConvBNReLU(cin, cout, 3, padding=1)
        self.alayers = nn.ModuleList(ABlock(group) for _ in range(cout // group))
        self.fusion_0 = ConvBNReLU(cout, cout, 3, padding=1)
        self.fusion_e = self._separable(cout, 3)
        self.fusion_e1 = self._separable(cout, 5)
        self.fusion = ConvBNReLU(3 * cout, cout, 1)

    @staticmethod
    def _separable(ch: int, k: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(ch, ch, (k, 1), padding=(k // 2, 0), bias=False),
            nn.BatchNorm2d(ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(ch, ch, (1, k), padding=(0, k // 2), bias=False),
            nn.BatchNorm2d(ch),
            nn.ReLU(inplace=True),
        )

    def forward(
        self, low: torch.Tensor, high: torch.Tensor, high_logits: torch.Tensor
    ) -> torch.Tensor:
        """low: (B, cout, 2h, 2w), high: (B, cin, h, w), high_logits: (B, 1, h, w) → (B, cout, 2h, 2w)."""

        def up(t: torch.Tensor) -> torch.Tensor:
            return F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=True)

        x = up(self.conv_up(high)) + low
        area = up(torch.sigmoid(high_logits))
        parts = torch.chunk(x, len(self.alayers), dim=1)
        fea = torch.cat([blk(p, area) for blk, p in zip(self.alayers, parts, strict=True)], 1)
        return self.fusion(
            torch.cat((self.fusion_0(fea), self.fusion_e(fea), self.fusion_e1(fea)), 1)
        )


class SENet(nn.Module):
    """Res2Net-v1b backbone + edge/area-guided decoder; returns the finest saliency map."""

    #: the decoder fuses stride-16 and stride-32 features with exact ×2 upsampling
    size_multiple = 32

    def __init__(self, cfg: SENetConfig = SENET) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = ResNet(
            block=Bottle2neck,  # type: ignore[arg-type]  # timm annotates only its own blocks
            layers=tuple(cfg.layers),
            base_width=cfg.base_width,
            block_args={"scale": cfg.scale},
            stem_type="deep",
            stem_width=cfg.stem_width,
            avg_down=True,
            num_classes=0,  # no classifier: the checkpoint has none
        )
        self.aspp3 = ASPP(1024, 256)
        self.aspp4 = ASPP(2048, 256)
        self.cbblock3 = CBAM(256, kernel_size=5)
        self.cbblock4 = CBAM(256, kernel_size=5)
        self.conv_up = ConvBNReLU(512, 512, 1)
        self.aux_edge = EdgeLayer(512, 256)
        self.aux_area = AreaLayer(512, 256)
        self.layer1_enhance = StructureE(256, 128, 128)
        self.layer2_enhance = StructureE(512, 256, 128)
        self.layer3_decoder = AMFusion(512, 256, 128)
        self.layer2_decoder = AMFusion(256, 128, 128)
        self.out_conv_8 = nn.Conv2d(256, 1, 1)
        self.out_conv_4 = nn.Conv2d(128, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, 3, H, W) normalised float, H and W multiples of 32.

        Returns: (B, 1, H, W) saliency probabilities (sigmoid of the 1/4-scale logits, upsampled).
        """
        bb: Any = self.backbone  # timm's ResNet attributes are untyped to mypy
        x0 = bb.maxpool(bb.act1(bb.bn1(bb.conv1(x))))
        l1 = bb.layer1(x0)
        l2 = bb.layer2(l1)
        l3 = bb.layer3(l2)
        l4 = bb.layer4(l3)
        l3e = self.cbblock3(self.aspp3(l3))
        l4e = self.cbblock4(self.aspp4(l4))
        l4e = F.interpolate(l4e, scale_factor=2, mode="bilinear", align_corners=False)
        l34 = self.conv_up(torch.cat((l4e, l3e), 1))
        edge = torch.sigmoid(self.aux_edge(l1, l34))
        area_logits = self.aux_area(l1, l34)
        l1e = self.layer1_enhance(l1, edge)
        l2e = self.layer2_enhance(l2, edge)
        l2f = self.layer3_decoder(l2e, l34, area_logits)
        out8 = self.out_conv_8(l2f)
        l1f = self.layer2_decoder(l1e, l2f, out8)
        # fp32 island (one output channel, ~0.1 % of the work): a bf16 sigmoid quantises the map to
        # 2^-9 relative (up to 0.5 grey level) and the head reads a small difference of large
        # features. Measured at 320² under bf16 (random weights, photos): mean |Δ| 1.29 → 1.23,
        # p99 4.58 → 4.36 grey levels with this island.
        with fp32_island(x.device):
            out4 = F.interpolate(
                self.out_conv_4(l1f.float()),
                size=x.shape[-2:],
                mode="bilinear",
                align_corners=False,
            )
            return torch.sigmoid(out4)


def build_network(variant: Variant, cfg: SENetConfig | U2NetConfig | None = None) -> nn.Module:
    """The bare network of ``variant`` (random weights); ``cfg`` defaults to the real preset."""
    if variant == "senet":
        return SENet(cfg if isinstance(cfg, SENetConfig) else SENET)
    if variant == "u2net":
        return U2Net(cfg if isinstance(cfg, U2NetConfig) else U2NET)
    raise ValueError(f"unknown salient variant {variant!r} (senet or u2net)")


def check_input_size(norm_size: tuple[int, int], net: nn.Module, source: object) -> None:
    """Refuse an input size the network's strides cannot take (SENet: multiples of 32)."""
    m = getattr(net, "size_multiple", 1)
    if any(s % m for s in norm_size):
        raise SalientConfigError(
            f"{source}: norm_size {norm_size} must be multiples of {m} for {type(net).__name__}"
        )
