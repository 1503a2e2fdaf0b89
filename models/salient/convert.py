"""ModelScope salient-detection state dicts → ours (pure functions, no I/O).

SENet (``damo/cv_res2net_salient-detection`` with ``config.py``): the decoder's keys are identical;
the backbone, which ModelScope stores as ``layer0_1`` (stem conv stack + BN) and ``layer1..4``, lives
under timm's names in ``backbone.``. ModelScope's ``ABlock`` builds two branches (``alayer``,
``arlayer``) that its forward never calls: their 72 checkpoint entries are dropped *by exact name*
here, after checking that every one is present with the right shape, so that a checkpoint from
another source still fails loudly. We drop them rather than keep dead modules because they would
only occupy device memory and make the module misstate what the network computes.

U2NET (no ``config.py``): every key is used and named as ours; the converter is the identity.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from vbatch.models.checkpoint import CheckpointError, StateDict
from vbatch.models.salient.model import SENet

# ModelScope prefix → ours, for SENet. Order matters only for readability: prefixes do not overlap
# ("layer1." never matches "layer1_enhance.").
SENET_PREFIXES: tuple[tuple[str, str], ...] = (
    ("layer0_1.0.", "backbone.conv1."),  # deep stem: conv-bn-relu-conv-bn-relu-conv
    ("layer0_1.1.", "backbone.bn1."),
    ("layer1.", "backbone.layer1."),
    ("layer2.", "backbone.layer2."),
    ("layer3.", "backbone.layer3."),
    ("layer4.", "backbone.layer4."),
)

# ABlock i of an AMFusion uses kernel _ABLOCK_KERNELS[i] in its unused branches (ModelScope's self.k).
_ABLOCK_KERNELS = (3, 3, 5, 5)
_BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _swap(key: str, table: tuple[tuple[str, str], ...]) -> str:
    for src, dst in table:
        if key.startswith(src):
            return dst + key[len(src) :]
    return key


def senet_unused_keys(model: SENet) -> dict[str, tuple[int, ...]]:
    """Name → shape of the checkpoint entries of ModelScope's never-called ``ABlock`` branches.

    Each ``alayers.i`` of ``layer3_decoder``/``layer2_decoder`` holds ``alayer`` and ``arlayer``:
    ConvBNReLU(c, c, k×k) then ConvBNReLU(c, c, 1×1), with c the block's width.
    """
    out: dict[str, tuple[int, ...]] = {}
    for dec_name in ("layer3_decoder", "layer2_decoder"):
        dec = getattr(model, dec_name)
        for i, blk in enumerate(dec.alayers):
            c = blk.fusion.block[1].num_features
            k = _ABLOCK_KERNELS[i]
            for branch in ("alayer", "arlayer"):
                for j, ksize in ((0, k), (1, 1)):
                    p = f"{dec_name}.alayers.{i}.{branch}.{j}.block."
                    out[p + "0.weight"] = (c, c, ksize, ksize)
                    for bn in _BN_KEYS:
                        out[p + "1." + bn] = () if bn == "num_batches_tracked" else (c,)
    return out


def convert_senet(state_dict: StateDict, model: SENet) -> StateDict:
    """ModelScope SENet checkpoint → :class:`~vbatch.models.salient.model.SENet` keys.

    Args:
        state_dict: as stored in ``pytorch_model.pt`` (976 entries for the published model).
        model: the network it is for (the unused-branch names depend on its decoder).

    Returns:
        A new dict with backbone keys renamed and the unused ``alayer``/``arlayer`` entries removed.

    Raises:
        CheckpointError: an unused-branch entry is missing or mis-shaped (anything else is left for
            the strict loader to report).
    """
    unused = senet_unused_keys(model)
    problems = [
        f"{k} (checkpoint {tuple(state_dict[k].shape)}, expected {shape})"
        for k, shape in unused.items()
        if k in state_dict and tuple(state_dict[k].shape) != shape
    ]
    missing = [k for k in unused if k not in state_dict]
    if missing:
        problems.append(f"missing unused-branch keys ({len(missing)}): {', '.join(missing[:10])}")
    if problems:
        raise CheckpointError("not a ModelScope SENet checkpoint: " + "; ".join(problems))
    return {_swap(k, SENET_PREFIXES): v for k, v in state_dict.items() if k not in unused}


def convert_u2net(state_dict: StateDict) -> StateDict:
    """ModelScope U2NET checkpoint → :class:`~vbatch.models.salient.u2net.U2Net` keys (identical names)."""
    return dict(state_dict)


def _unswap(key: str) -> str:
    return _swap(key, tuple((dst, src) for src, dst in SENET_PREFIXES))


def senet_to_modelscope(
    state_dict: StateDict, model: SENet, unused: Mapping[str, torch.Tensor] | None = None
) -> StateDict:
    """Inverse of :func:`convert_senet`, for writing test/demo model directories in ModelScope's layout.

    Args:
        state_dict: our SENet's state dict.
        model: the network (for the unused-branch names and shapes).
        unused: values for the unused-branch entries by name; zeros where not given.
    """
    out = {_unswap(k): v for k, v in state_dict.items()}
    given = unused or {}
    for k, shape in senet_unused_keys(model).items():
        if k in given:
            out[k] = given[k]
        elif k.endswith("num_batches_tracked"):
            out[k] = torch.zeros((), dtype=torch.long)
        else:
            out[k] = torch.zeros(shape)
    return out
