"""ModelScope's PASS ``pytorch_model.pt`` state dict → :class:`~vbatch.models.reid.model.ReidNet` keys.

Reference: ModelScope 1.40.2 ``models/cv/image_reid_person/pass_model.py`` and ``transreid_model.py``.
Pure functions, no I/O; training-only keys are dropped by name (``_DROPPED``).
"""

from __future__ import annotations

import logging

import torch

from vbatch.models.checkpoint import CheckpointError, StateDict

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------
# pytorch_model.pt

# ModelScope prefix → ours. Block internals keep timm's names (norm1, attn.qkv, attn.proj, norm2,
# mlp.fc1, mlp.fc2), which the reference's blocks share.
_PREFIXES: tuple[tuple[str, str], ...] = (
    ("base.patch_embed.proj.", "backbone.patch_proj."),
    ("base.pos_embed", "backbone.pos_embed"),
    ("base.blocks.", "backbone.blocks."),
    ("base.norm.", "backbone.norm."),
    ("bottleneck.", "neck.bn."),  # the fused-vector BN, or the cls BN with MULTI_NECK
    ("bottleneck_1.", "neck.part_bns.0."),
    ("bottleneck_2.", "neck.part_bns.1."),
    ("bottleneck_3.", "neck.part_bns.2."),
)
# four (1, 1, D) parameters each, concatenated in this order into one (1, 4, D) parameter of ours
_STACKED: dict[str, tuple[str, ...]] = {
    "backbone.tokens": (
        "base.cls_token",
        "base.part_token1",
        "base.part_token2",
        "base.part_token3",
    ),
    "backbone.token_pos": ("base.cls_pos", "base.part1_pos", "base.part2_pos", "base.part3_pos"),
}
# Keys the checkpoint carries that inference never uses, dropped by name:
_DROPPED: dict[str, str] = {
    # the ID classifier of fine-tuning (cross-entropy over the training identities)
    "classifier.weight": "training-only ID classifier",
    # TransReID's ImageNet head (num_classes=1000 by default); its forward never calls it
    "base.fc.weight": "unused ImageNet head of the backbone",
    "base.fc.bias": "unused ImageNet head of the backbone",
    # camera/view embeddings (SIE): ModelScope builds the backbone with camera=view=0, so they are
    # never created nor added (its loader silently skips them if a checkpoint has them)
    "base.sie_embed": "camera/view embedding the reference never uses",
}


def from_modelscope(sd: StateDict) -> StateDict:
    """Convert ModelScope's PASS state dict to :class:`~vbatch.models.reid.model.ReidNet` keys (pure).

    Args:
        sd: ``pytorch_model.pt`` as read by :func:`vbatch.models.checkpoint.read_state_dict`.

    Returns:
        Our state dict. Keys no rule knows are passed through unchanged, so that the strict load
        reports them as unexpected.

    Raises:
        CheckpointError: a token or token-position parameter is missing or mis-shaped.
    """
    out: StateDict = {}
    stacked_sources = {k for keys in _STACKED.values() for k in keys}
    for key, value in sd.items():
        if key in _DROPPED:
            logger.debug("dropping %s (%s)", key, _DROPPED[key])
            continue
        if key in stacked_sources:
            continue
        for src, dst in _PREFIXES:
            if key.startswith(src):
                out[dst + key[len(src) :]] = value
                break
        else:
            out[key] = value
    for dst, srcs in _STACKED.items():
        missing = [k for k in srcs if k not in sd]
        if missing:
            raise CheckpointError(f"checkpoint is missing keys: {', '.join(missing)}")
        shapes = {k: tuple(sd[k].shape) for k in srcs}
        if any(len(s) != 3 or s[:2] != (1, 1) or s != shapes[srcs[0]] for s in shapes.values()):
            raise CheckpointError(
                "shape mismatches: "
                + ", ".join(f"{k} {s}" for k, s in shapes.items())
                + " (expected four (1, 1, D))"
            )
        out[dst] = torch.cat([sd[k] for k in srcs], dim=1)
    return out


def to_modelscope(sd: StateDict) -> StateDict:
    """Inverse of :func:`from_modelscope` (without the dropped keys): our state dict in ModelScope's
    key names, for writing model directories."""
    out: StateDict = {}
    for key, value in sd.items():
        if key in _STACKED:
            for i, src in enumerate(_STACKED[key]):
                out[src] = value[:, i : i + 1].clone()
            continue
        for src, dst in _PREFIXES:
            if key.startswith(dst):
                out[src + key[len(dst) :]] = value
                break
        else:
            raise KeyError(f"no ModelScope name for {key!r}")
    return out
