"""MTTR, the Multimodal Tracking Transformer, assembled.

Botach, Zheltonozhskii and Baskin, "End-to-End Referring Video Object Segmentation with Multimodal
Transformers" (CVPR 2022, arXiv:2111.14821); the reference is ModelScope 1.40.2's
``models/cv/referring_video_object_segmentation/utils/mttr.py`` (class ``MTTR``), in eval mode.

What batches: one forward takes ONE clip (a window of frames) and any number of text queries. The
video backbone runs once for the clip and its features are shared; the text encoder, the
multimodal transformer and the mask decoder run on all queries at once (batch T·B). Different clips
cannot share a forward (the reference pads clips of different sizes with a padding mask that this
port does not implement: the pipeline never pads).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from vbatch.models.rvos.config import RVOSConfig
from vbatch.models.rvos.decoder import KernelHead, SpatialDecoder
from vbatch.models.rvos.swin import VideoSwinBackbone
from vbatch.models.rvos.text import TextEncoder
from vbatch.models.rvos.transformer import MultimodalTransformer

logger = logging.getLogger(__name__)


class MTTR(nn.Module):
    """Video clip + text queries -> per-frame mask logits and "is referred" logits of every query slot.

    Submodules: ``backbone`` (video Swin), ``text`` (RoBERTa + projection), ``vid_proj`` (1x1 conv of
    the last backbone stage to d_model), ``fusion`` (multimodal transformer), ``query_embed`` (object
    query slots), ``pixel_decoder`` (FPN), ``kernel_head`` and ``referred_head``.
    """

    def __init__(self, cfg: RVOSConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = VideoSwinBackbone(cfg.swin)
        channels = cfg.swin.channels
        self.text = TextEncoder(cfg.text, cfg.d_model)
        self.vid_proj = nn.Conv2d(channels[-1], cfg.d_model, kernel_size=1)
        self.fusion = MultimodalTransformer(
            cfg.d_model,
            cfg.nheads,
            cfg.dim_feedforward,
            cfg.num_encoder_layers,
            cfg.num_decoder_layers,
            cfg.activation,
        )
        self.query_embed = nn.Embedding(cfg.num_queries, cfg.d_model)
        self.pixel_decoder = SpatialDecoder(
            cfg.d_model, tuple(channels[:-1][::-1]), cfg.mask_kernels_dim
        )
        self.kernel_head = KernelHead(cfg.d_model, cfg.mask_kernels_dim)
        self.referred_head = nn.Linear(cfg.d_model, 2)

    def forward(
        self, frames: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """
        Args:
            frames: (T, 3, H, W) float, one clip, resized and ImageNet-normalised.
            input_ids, attention_mask: (B, S) int64, the tokenised queries (padded to the longest).

        Returns:
            ``pred_masks``: (T, B, Nq, ceil(H/4), ceil(W/4)) mask logits;
            ``pred_is_referred``: (T, B, Nq, 2) logits (index 0 = "is the referred object").
        """
        feats = self.backbone(frames)  # finest first
        txt, txt_pad = self.text(input_ids, attention_mask)
        t, b = frames.shape[0], input_ids.shape[0]
        vid = self.vid_proj(feats[-1])
        hs, vid_memory = self.fusion(vid, txt, txt_pad, self.query_embed.weight)
        adapted = self.pixel_decoder.adapt(feats[:-1][::-1])
        maps = self.pixel_decoder(vid_memory.flatten(0, 1), adapted, repeats=b)
        maps = maps.view(t, b, *maps.shape[1:])  # (T, B, K, H/4, W/4)
        kernels = self.kernel_head(hs)  # (T, B, Nq, K)
        masks = torch.einsum("tbnc,tbchw->tbnhw", kernels, maps)
        return {"pred_masks": masks, "pred_is_referred": self.referred_head(hs)}
