"""ModelScope MTTR checkpoint keys <-> ours.

The source is ModelScope 1.40.2's ``ReferringVideoObjectSegmentation`` checkpoint
(``pytorch_model.pt``, possibly wrapped in ``model_state_dict``, which ``read_state_dict`` unwraps),
whose keys are those of ``utils/mttr.py``'s ``MTTR``. The mapping is a table of key prefixes; there
are no reshapes. Two buffers are dropped by name:

* ``backbone.layers.*.blocks.*.attn.relative_position_index``: a constant index table that the
  reference registers as a persistent buffer; ours rebuilds it from the window size.
* ``transformer.text_encoder.embeddings.position_ids``: ``arange`` positions that transformers < 4.31
  saved; the reference deletes it before loading (``compatible_position_ids``) and so do we. It is
  dropped when present, not required.

Keys that match no rule are passed through unchanged so that the strict check lists them as
unexpected together with every missing and mis-shaped key.
"""

from __future__ import annotations

import re

import torch
from torch import nn

StateDict = dict[str, torch.Tensor]

#: ModelScope prefix -> our prefix; the first match wins (order matters for overlapping prefixes)
SWAPS: tuple[tuple[str, str], ...] = (
    ("backbone.patch_embed.", "backbone.patch_embed."),
    ("backbone.layers.", "backbone.stages."),
    ("backbone.downsamples.", "backbone.merges."),
    ("transformer.text_encoder.", "text.encoder."),
    ("transformer.txt_proj.fc.", "text.proj.fc."),
    ("transformer.txt_proj.layer_norm.", "text.proj.norm."),
    ("transformer.encoder.layers.", "fusion.encoder."),
    ("transformer.decoder.norm.", "fusion.decoder_norm."),
    ("transformer.decoder.layers.", "fusion.decoder."),
    ("vid_embed_proj.", "vid_proj."),
    ("obj_queries.", "query_embed."),
    ("is_referred_head.", "referred_head."),
    ("instance_kernels_head.layers.", "kernel_head.layers."),
    ("spatial_decoder.lay1.", "pixel_decoder.convs.0."),
    ("spatial_decoder.lay2.", "pixel_decoder.convs.1."),
    ("spatial_decoder.lay3.", "pixel_decoder.convs.2."),
    ("spatial_decoder.lay4.", "pixel_decoder.convs.3."),
    ("spatial_decoder.gn1.", "pixel_decoder.norms.0."),
    ("spatial_decoder.gn2.", "pixel_decoder.norms.1."),
    ("spatial_decoder.gn3.", "pixel_decoder.norms.2."),
    ("spatial_decoder.gn4.", "pixel_decoder.norms.3."),
    ("spatial_decoder.adapter1.", "pixel_decoder.adapters.0."),
    ("spatial_decoder.adapter2.", "pixel_decoder.adapters.1."),
    ("spatial_decoder.out_lay.", "pixel_decoder.out_conv."),
)

#: module renames inside a prefix (our decoder layer calls its cross-attention ``cross_attn``)
_INNER = (("fusion.decoder.", ".multihead_attn.", ".cross_attn."),)

_DROPPED = (
    re.compile(r"^backbone\.layers\.\d+\.blocks\.\d+\.attn\.relative_position_index$"),
    re.compile(r"^transformer\.text_encoder\.embeddings\.position_ids$"),
)


def _swap(key: str, table: tuple[tuple[str, str], ...]) -> str:
    for src, dst in table:
        if key.startswith(src):
            return dst + key[len(src) :]
    return key


def from_modelscope(state_dict: StateDict) -> StateDict:
    """ModelScope's MTTR state dict -> ours (pure; tensors are shared, not copied)."""
    out: StateDict = {}
    for key, value in state_dict.items():
        if any(p.match(key) for p in _DROPPED):
            continue
        new = _swap(key, SWAPS)
        for prefix, a, b in _INNER:
            if new.startswith(prefix):
                new = new.replace(a, b, 1)
        out[new] = value
    return out


def to_modelscope(state_dict: StateDict) -> StateDict:
    """Ours -> ModelScope's keys (the inverse of :func:`from_modelscope` on the keys it keeps)."""
    inverse = tuple((dst, src) for src, dst in SWAPS)
    out: StateDict = {}
    for key, value in state_dict.items():
        for prefix, a, b in _INNER:
            if key.startswith(prefix):
                key = key.replace(b, a, 1)
        out[_swap(key, inverse)] = value
    return out


def modelscope_state_dict(model: nn.Module) -> StateDict:
    """A full checkpoint in ModelScope's keys, as the reference saves and loads it.

    Adds the two buffers :func:`from_modelscope` drops: every block's ``relative_position_index``
    (persistent in the reference) and the text encoder's ``position_ids`` (real MTTR checkpoints,
    saved with transformers < 4.31, carry it and the reference's loader deletes it unconditionally).
    """
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, buf in model.named_buffers():
        if name.endswith(".attn.relative_position_index"):
            sd[name] = buf.clone()
        elif name == "text.encoder.embeddings.position_ids":
            sd[name] = buf.clone()
    return to_modelscope(sd)
