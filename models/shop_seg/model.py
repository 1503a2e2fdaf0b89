"""shop-seg: DenseCLIP (CLIP ViT-B/16 at 1024²) product segmentation, 2 classes (others / foreground).

DenseCLIP (Rao et al., CVPR 2022, "DenseCLIP: Language-Guided Dense Prediction with Context-Aware
Prompting"; github.com/raoyongming/DenseCLIP) with a Semantic-FPN decoder. Reference implementation:
ModelScope 1.40.2 ``models/cv/shop_segmentation/`` (``SHOPSEG`` in ``shop_seg_base.py``) for the model
``damo/cv_vitb16_segmentation_shop-seg``.

Differences from the reference, none of which changes a result:

* The text features of the two prompts do not depend on the image: they are computed once
  (:meth:`ShopSegNet.set_prompts`) instead of on every call. The reference encodes 2·B prompts for a
  batch of B and lets the context decoder's self-attention run over all 2·B of them; since the
  prompts repeat in identical pairs, attending to one pair gives the same values. We run the
  context decoder on each image's own pair, so an image's result does not depend on its batch and a
  batch costs B × one image (the reference's costs grow as B²).
* Normalisation and zero padding happen on the device from a uint8 RGB + validity-mask input
  (:meth:`ShopSegNet.normalize`), so 4 bytes per pixel cross to the GPU instead of 12.
"""

from __future__ import annotations

import logging
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from vbatch.models.precision import ACTIVATION_BYTES, PRECISIONS
from vbatch.models.shop_seg.clip import PromptTextEncoder, ViTPyramid
from vbatch.models.shop_seg.config import FULL, WEIGHTS, ShopSegConfig
from vbatch.models.shop_seg.decoder import ContextDecoder, FPNHead, FPNNeck

logger = logging.getLogger(__name__)


class ShopSegNet(nn.Module):
    """DenseCLIP segmentor: ViT pyramid + prompt text encoder + context decoder + FPN neck and head."""

    def __init__(self, config: ShopSegConfig = FULL) -> None:
        super().__init__()
        c = config
        self.config = c
        self.visual = ViTPyramid(
            c.image_size,
            c.patch_size,
            c.vision_width,
            c.vision_depth,
            c.vision_heads,
            c.embed_dim,
            c.out_indices,
        )
        self.text = PromptTextEncoder(
            c.vocab_size,
            c.text_context_length,
            c.text_width,
            c.text_depth,
            c.text_heads,
            c.embed_dim,
        )
        #: learned prompt context (CoOp), inserted after the start token of every prompt
        self.prompt_context = nn.Parameter(torch.zeros(1, c.num_context, c.text_width))
        #: scale of the context decoder's update of the text embeddings
        self.text_gamma = nn.Parameter(torch.zeros(c.embed_dim))
        self.context_decoder = ContextDecoder(
            c.embed_dim, c.decoder_width, c.decoder_heads, c.decoder_depth
        )
        in_channels = [c.vision_width] * 4
        in_channels[c.score_level] += c.num_classes
        self.neck = FPNNeck(tuple(in_channels), c.fpn_channels)
        self.head = FPNHead(c.fpn_channels, c.num_classes)
        self.register_buffer("mean", torch.tensor(WEIGHTS.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(WEIGHTS.std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("prompt_features", torch.zeros(0, c.embed_dim), persistent=False)

    @torch.no_grad()
    def set_prompts(self, tokens: torch.Tensor) -> None:
        """Encode the class prompts once, in fp32, and keep them for :meth:`forward`.

        Args:
            tokens: (K, prompt_length) int64 CLIP tokens of the K class names.
        """
        self.prompt_features = self.text(
            tokens.to(self.prompt_context.device), self.prompt_context
        ).float()

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP normalisation, then zeros where the input is padding (as the reference pads after normalising).

        Args:
            images: (B, S, S, 4) uint8: RGB and a validity channel (non-zero where the image is).

        Returns:
            (B, 3, S, S) float32.
        """
        x = images.permute(0, 3, 1, 2)
        valid = x[:, 3:4] != 0
        # x/255 first, then (x - mean) / std, in float32 like the reference's numpy code
        rgb = x[:, :3].float() / 255.0
        mean, std = cast(torch.Tensor, self.mean), cast(torch.Tensor, self.std)
        rgb = (rgb - mean) / std
        return torch.where(valid, rgb, torch.zeros((), dtype=rgb.dtype, device=rgb.device))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """
        Args:
            pixels: (B, 3, S, S) normalised, zero-padded images.

        Returns:
            (B, K, S/4, S/4) class logits (K = 2: others, foreground).
        """
        if self.prompt_features.shape[0] != self.config.num_classes:
            raise RuntimeError("ShopSegNet.set_prompts(tokens) must run before forward")
        pyramid, global_embed, dense_embed = self.visual(pixels)
        b = pixels.shape[0]
        text = self.prompt_features.to(dense_embed.dtype).expand(b, -1, -1)  # (B, K, E)
        visual_context = torch.cat(
            [global_embed[:, None], dense_embed.flatten(2).transpose(1, 2)], dim=1
        )
        text = text + self.text_gamma * self.context_decoder(text, visual_context)
        scores = torch.einsum(
            "bchw,bkc->bkhw",
            F.normalize(dense_embed, dim=1),
            F.normalize(text, dim=2).to(dense_embed.dtype),
        )
        pyramid[self.config.score_level] = torch.cat(
            [pyramid[self.config.score_level], scores], dim=1
        )
        feats = self.neck(pyramid)
        # the backbone's maps are dead: free them before the head (its peak is at stride 4)
        del pyramid, dense_embed, visual_context
        return self.head(feats)

    def segment_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """The reference's class probabilities: bilinear to S×S, softmax; in fp32 whatever the
        forward's precision (the logits are upcast first).

        Args:
            logits: (B, K, h, w).

        Returns:
            (B, K, S, S) float32.
        """
        s = self.config.image_size
        up = F.interpolate(logits.float(), size=(s, s), mode="bilinear", align_corners=False)
        return up.softmax(dim=1)

    def segment(self, logits: torch.Tensor) -> torch.Tensor:
        """The reference's decision: argmax of :meth:`segment_probabilities` (ties → class 0,
        background).

        Args:
            logits: (B, K, h, w).

        Returns:
            (B, S, S) uint8 class map.
        """
        return self.segment_probabilities(logits).argmax(dim=1).to(torch.uint8)


def activation_bytes_per_image(config: ShopSegConfig = FULL, precision: str = "fp32") -> int:
    """Peak inference activation memory for one image (weights excluded), in bytes.

    The peak is in the FPN neck's top-down pass: the 4 pyramid maps (C channels at strides 4…32)
    are alive with the neck's laterals (F channels) and ~2.5 stride-4 F-channel maps in flight
    (upsampled map, sum, output conv), plus the normalised input. The ViT (4097 tokens × C, ~0.2 GB
    in fp32) stays below that, with fused attention that never stores the 4097² map; the head runs
    after the pyramid is freed; the S² logits, softmax and argmax add ~25 MB.

    FULL at 1024²: this count gives 541 MB (fp32) / 272 MB (bf16, fp16); measured on CPU as the peak
    of live tensor bytes (``bench/bench_shop_seg_model.py``, batch 1 → 2): 520 MB / 266 MB per image.
    Weights: 170.5 M parameters, 0.68 GB in fp32. On a GPU leave headroom for the caching allocator
    and cuDNN workspaces, e.g. ``batch = int(0.6 * (free_bytes - weights) / estimate)``.

    Args:
        config: architecture.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (autocast halves the activations).

    Returns:
        Bytes for one image.
    """
    if precision not in ACTIVATION_BYTES:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    nbytes = ACTIVATION_BYTES[precision]
    s = config.image_size
    levels = [(s // stride) ** 2 for stride in (4, 8, 16, 32)]
    pyramid = config.vision_width * sum(levels) + config.num_classes * levels[2]
    neck = config.fpn_channels * (sum(levels) + 2.5 * levels[0])
    pixels = 3 * s * s
    return int((pyramid + neck + pixels) * nbytes) + 4 * s * s  # + the uint8 RGBA input
