"""MTTR's text side: RoBERTa (Liu et al., arXiv:1907.11692) and a projection to the transformer width.

Follows ModelScope 1.40.2's ``MultimodalTransformer.forward_text`` (``utils/multimodal_transformer.py``):
queries are tokenised together with padding to the longest one, encoded by RoBERTa without its
pooler, projected by ``Linear -> LayerNorm(eps=1e-12)``; the padding mask is ``attention_mask != 1``.
RoBERTa is built with ``transformers.RobertaModel`` from the model directory's
``transformer_cfg_dir/config.json`` (read as data) and its weights come from the MTTR checkpoint,
which overrides whatever weights that folder carries. The tokenizer is loaded from the same folder,
locally; nothing is fetched from a hub.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import RobertaConfig, RobertaModel, RobertaTokenizerFast

from vbatch.models.rvos.config import TextConfig

logger = logging.getLogger(__name__)


def normalize_query(query: str) -> str:
    """The pipeline's clean-up of a text query: lower case, runs of whitespace collapsed to one space."""
    return " ".join(query.lower().split())


def roberta_config(cfg: TextConfig) -> RobertaConfig:
    return RobertaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        hidden_act=cfg.hidden_act,
        max_position_embeddings=cfg.max_position_embeddings,
        type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.layer_norm_eps,
        pad_token_id=cfg.pad_token_id,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
    )


def load_tokenizer(text_dir: Path) -> RobertaTokenizerFast:
    """The byte-level BPE tokenizer saved in ``text_dir`` (``tokenizer.json`` or vocab.json + merges.txt)."""
    return RobertaTokenizerFast.from_pretrained(str(text_dir), local_files_only=True)


def max_query_tokens(cfg: TextConfig) -> int:
    """The longest query RoBERTa can encode, ``<s>`` and ``</s>`` included (512 for roberta-base).

    RoBERTa numbers positions from ``pad_token_id + 1``, so of its ``max_position_embeddings`` (514)
    rows, ``pad_token_id + 1`` are never used by a token.
    """
    return cfg.max_position_embeddings - cfg.pad_token_id - 1


def tokenize(
    tokenizer: RobertaTokenizerFast, queries: Sequence[str], max_tokens: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise queries together, padded to the longest.

    Args:
        queries: already normalised.
        max_tokens: refuse a longer query (:func:`max_query_tokens`) instead of failing inside the
            encoder with an index error.

    Returns:
        input_ids, attention_mask: (B, S) int64.

    Raises:
        ValueError: a query is longer than ``max_tokens`` (names it and the limit).
    """
    enc = tokenizer(list(queries), padding="longest", return_tensors="pt")
    if max_tokens is not None:
        lengths = enc["attention_mask"].sum(dim=1).tolist()
        over = [(i, n) for i, n in enumerate(lengths) if n > max_tokens]
        if over:
            i, n = over[0]
            raise ValueError(
                f"query {i} has {n} tokens; the text encoder takes at most {max_tokens}"
            )
    return enc["input_ids"], enc["attention_mask"]


class FeatureResizer(nn.Module):
    """Linear projection to the transformer width, then LayerNorm (eps 1e-12, as the reference)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc(x))


class TextEncoder(nn.Module):
    """RoBERTa (no pooler) + :class:`FeatureResizer`."""

    def __init__(self, cfg: TextConfig, d_model: int) -> None:
        super().__init__()
        self.encoder = RobertaModel(roberta_config(cfg), add_pooling_layer=False)
        self.proj = FeatureResizer(cfg.hidden_size, d_model)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: input_ids, attention_mask: (B, S).

        Returns:
            memory: (B, S, d_model) float; pad_mask: (B, S) bool, True on padding tokens.
        """
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.proj(hidden), attention_mask.ne(1)
