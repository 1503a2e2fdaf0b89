"""ModelScope shop-seg state dict (``SHOPSEG`` of ``models/cv/shop_segmentation``) ↔ :class:`ShopSegNet`.

A pure key swap: one table of (ModelScope, ours) name templates, ``{i}`` standing for a block index.
No tensor needs a reshape: ``nn.MultiheadAttention``'s packed ``in_proj_weight`` is q, k, v stacked in
the same order as timm's ``qkv`` linear. Nothing is dropped: the checkpoint holds no training-only
entries (BatchNorm's ``num_batches_tracked`` exists on our side too). A key that matches no template
comes out as ``modelscope.<key>`` so that the strict loader lists it as unexpected.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

UNMAPPED_PREFIX = "modelscope."

# CLIP residual block (nn.MultiheadAttention + c_fc/c_proj MLP) → timm Block
_CLIP_BLOCK = [
    ("attn.in_proj_weight", "attn.qkv.weight"),
    ("attn.in_proj_bias", "attn.qkv.bias"),
    ("attn.out_proj.", "attn.proj."),
    ("ln_1.", "norm1."),
    ("ln_2.", "norm2."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
]

# (ModelScope, ours); entries ending in "." are prefixes, the others whole names. First match wins.
SWAPS: list[tuple[str, str]] = [
    *[
        (f"backbone.transformer.resblocks.{{i}}.{a}", f"visual.blocks.{{i}}.{b}")
        for a, b in _CLIP_BLOCK
    ],
    ("backbone.conv1.", "visual.patch_embed."),
    ("backbone.class_embedding", "visual.cls_token"),
    ("backbone.positional_embedding", "visual.pos_embed"),
    ("backbone.ln_pre.", "visual.norm_pre."),
    ("backbone.ln_post.", "visual.norm_post."),
    ("backbone.proj", "visual.proj"),
    ("backbone.fpn1.", "visual.up4."),
    ("backbone.fpn2.", "visual.up2."),
    ("backbone.fpn3.", "visual.same."),
    ("backbone.fpn4.", "visual.down2."),
    *[
        (f"text_encoder.transformer.resblocks.{{i}}.{a}", f"text.blocks.{{i}}.{b}")
        for a, b in _CLIP_BLOCK
    ],
    ("text_encoder.token_embedding.", "text.token_embed."),
    ("text_encoder.positional_embedding", "text.pos_embed"),
    ("text_encoder.ln_final.", "text.norm_final."),
    ("text_encoder.text_projection", "text.proj"),
    ("contexts", "prompt_context"),
    ("gamma", "text_gamma"),
    ("context_decoder.decoder.{i}.mlp.0.", "context_decoder.layers.{i}.mlp.fc1."),
    ("context_decoder.decoder.{i}.mlp.3.", "context_decoder.layers.{i}.mlp.fc2."),
    ("context_decoder.decoder.{i}.self_attn.", "context_decoder.layers.{i}.self_attn."),
    ("context_decoder.decoder.{i}.cross_attn.", "context_decoder.layers.{i}.cross_attn."),
    *[
        (f"context_decoder.decoder.{{i}}.norm{n}.", f"context_decoder.layers.{{i}}.norm{n}.")
        for n in (1, 2, 3)
    ],
    ("context_decoder.memory_proj.", "context_decoder.memory_proj."),
    ("context_decoder.text_proj.", "context_decoder.text_proj."),
    ("context_decoder.out_proj.", "context_decoder.out_proj."),
    ("neck.lateral_convs.{i}.conv.", "neck.lateral.{i}."),
    ("neck.fpn_convs.{i}.conv.", "neck.smooth.{i}."),
    ("head_fpn.scale_heads.", "head.scale_heads."),
    ("head_fpn.conv_seg.", "head.classifier."),
]


def _compile(template: str) -> re.Pattern[str]:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)")
    return re.compile(pattern if template.endswith(".") else pattern + "$")


_FORWARD = [(_compile(src), dst) for src, dst in SWAPS]
_BACKWARD = [(_compile(dst), src) for src, dst in SWAPS]


def _swap(key: str, table: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, target in table:
        m = pattern.match(key)
        if m:
            head = target.replace("{i}", m.group("i")) if "i" in m.groupdict() else target
            return head + key[m.end() :]
    return None


def convert_modelscope(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ModelScope ``SHOPSEG.state_dict()`` → :class:`ShopSegNet` keys (unknown keys marked, see module doc)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new = _swap(key, _FORWARD)
        out[new if new is not None else UNMAPPED_PREFIX + key] = value
    return out


def to_modelscope(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """:class:`ShopSegNet` state dict → ModelScope's key names (for writing test model directories)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new = _swap(key, _BACKWARD)
        if new is None:
            raise KeyError(f"no ModelScope name for {key!r}")
        out[new] = value
    return out
