"""MTTR's multimodal transformer: a DETR-style encoder over video and text tokens, and a decoder of
object queries.

Botach et al., "End-to-End Referring Video Object Segmentation with Multimodal Transformers"
(CVPR 2022); behaviour of ModelScope 1.40.2's ``utils/multimodal_transformer.py`` and
``position_encoding_2d.py``. Every frame is one sequence: its (h·w) video tokens, with 2D sine
position embeddings, followed by the query's text tokens (zero position embedding). The encoder is
post-norm; the decoder's object queries start from zeros with learned query position embeddings and
the output of its last layer goes through a final LayerNorm. Only the last decoder layer's output is
returned: the reference's intermediate outputs only feed training losses.

Several text queries are batched: frame ``t`` of query ``b`` is sequence ``t·B + b``; the video
tokens are shared, the text tokens and their padding masks differ per query.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


def sine_position_embedding(
    h: int, w: int, dim: int, device: torch.device, temperature: float = 10000.0
) -> torch.Tensor:
    """DETR's normalised 2D sine embedding of an unpadded (h, w) grid.

    Returns: (h, w, dim) float, the first dim/2 channels encode y, the last dim/2 encode x.
    """
    npf = dim // 2
    eps, scale = 1e-6, 2 * math.pi
    y = torch.arange(1, h + 1, dtype=torch.float32, device=device)
    x = torch.arange(1, w + 1, dtype=torch.float32, device=device)
    y = y / (y[-1:] + eps) * scale
    x = x / (x[-1:] + eps) * scale
    dim_t = torch.arange(npf, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / npf)

    def embed(v: torch.Tensor) -> torch.Tensor:
        p = v[:, None] / dim_t  # (n, npf)
        return torch.stack((p[:, 0::2].sin(), p[:, 1::2].cos()), dim=2).flatten(1)

    pos_y = embed(y)[:, None, :].expand(h, w, npf)
    pos_x = embed(x)[None, :, :].expand(h, w, npf)
    return torch.cat((pos_y, pos_x), dim=2)


def _activation(name: str):
    return {"relu": F.relu, "gelu": F.gelu}[name]


class EncoderLayer(nn.Module):
    """Post-norm self-attention + feed-forward; sequences are (S, N, C) like nn.MultiheadAttention's default."""

    def __init__(self, d_model: int, nheads: int, dim_feedforward: int, activation: str) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nheads)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.act = _activation(activation)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        """Args: src, pos: (S, N, C); pad_mask: (N, S) bool, True = ignore. Returns (S, N, C)."""
        qk = src + pos
        src = self.norm1(
            src + self.self_attn(qk, qk, src, key_padding_mask=pad_mask, need_weights=False)[0]
        )
        return self.norm2(src + self.linear2(self.act(self.linear1(src))))


class DecoderLayer(nn.Module):
    """Post-norm self-attention between queries, cross-attention to the memory, feed-forward."""

    def __init__(self, d_model: int, nheads: int, dim_feedforward: int, activation: str) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nheads)
        self.cross_attn = nn.MultiheadAttention(d_model, nheads)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.act = _activation(activation)

    def forward(
        self,
        tgt: torch.Tensor,
        query_pos: torch.Tensor,
        memory: torch.Tensor,
        pos: torch.Tensor,
        memory_pad_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Args: tgt, query_pos: (Nq, N, C); memory, pos: (S, N, C); memory_pad_mask: (N, S). Returns (Nq, N, C)."""
        q = tgt + query_pos
        tgt = self.norm1(tgt + self.self_attn(q, q, tgt, need_weights=False)[0])
        att = self.cross_attn(
            tgt + query_pos,
            memory + pos,
            memory,
            key_padding_mask=memory_pad_mask,
            need_weights=False,
        )
        tgt = self.norm2(tgt + att[0])
        return self.norm3(tgt + self.linear2(self.act(self.linear1(tgt))))


class MultimodalTransformer(nn.Module):
    """Encoder over [video tokens; text tokens] per frame, decoder of object queries."""

    def __init__(
        self,
        d_model: int,
        nheads: int,
        dim_feedforward: int,
        num_encoder_layers: int,
        num_decoder_layers: int,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.encoder = nn.ModuleList(
            EncoderLayer(d_model, nheads, dim_feedforward, activation)
            for _ in range(num_encoder_layers)
        )
        self.decoder = nn.ModuleList(
            DecoderLayer(d_model, nheads, dim_feedforward, activation)
            for _ in range(num_decoder_layers)
        )
        self.decoder_norm = nn.LayerNorm(d_model)

    def forward(
        self,
        vid: torch.Tensor,
        txt: torch.Tensor,
        txt_pad_mask: torch.Tensor,
        obj_queries: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            vid: (T, C, h, w) projected video features, shared by all queries.
            txt: (B, S, C) projected text features of B queries; txt_pad_mask: (B, S) bool.
            obj_queries: (Nq, C) query position embeddings.

        Returns:
            hs: (T, B, Nq, C) the last decoder layer's output, normalised.
            vid_memory: (T, B, C, h, w) the encoder's output at the video tokens.
        """
        t, c, h, w = vid.shape
        b = txt.shape[0]
        n = t * b  # sequence t*B + b: frame t, query b
        vid_seq = vid.flatten(2).permute(2, 0, 1)  # (hw, T, C)
        vid_seq = vid_seq.repeat_interleave(b, dim=1)  # (hw, T*B, C)
        txt_seq = txt.transpose(0, 1).repeat(1, t, 1)  # (S, T*B, C): index t*B + b -> query b
        src = torch.cat((vid_seq, txt_seq), dim=0)
        pad_mask = torch.cat(
            (torch.zeros(n, h * w, dtype=torch.bool, device=vid.device), txt_pad_mask.repeat(t, 1)),
            dim=1,
        )
        vid_pos = sine_position_embedding(h, w, self.d_model, vid.device).to(vid.dtype)
        pos = torch.cat(
            (vid_pos.flatten(0, 1)[:, None, :].expand(h * w, n, c), torch.zeros_like(txt_seq)),
            dim=0,
        )

        memory = src
        for layer in self.encoder:
            memory = layer(memory, pos, pad_mask)

        query_pos = obj_queries[:, None, :].expand(-1, n, -1)
        out = torch.zeros_like(query_pos)
        for layer in self.decoder:
            out = layer(out, query_pos, memory, pos, pad_mask)
        hs = self.decoder_norm(out).view(-1, t, b, c).permute(1, 2, 0, 3)  # (T, B, Nq, C)
        vid_memory = memory[: h * w].view(h, w, t, b, c).permute(2, 3, 4, 0, 1)  # (T, B, C, h, w)
        return hs, vid_memory
