"""One strict checkpoint loader for every vbatch model.

ModelScope's own loaders differ per model (reid silently skips keys it cannot copy); ours is the
same everywhere: ``torch.load(weights_only=True)``, unwrap the usual containers, strip DataParallel's
``module.`` prefix, hand the dict to a model-specific pure converter, then ``load_state_dict(strict=True)``
after a full comparison of names and shapes, so that a wrong checkpoint fails with every problem
listed at once rather than the first one. A silently wrong weight is a silently wrong nightly run.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from vbatch.models.base import CheckpointError

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

# Containers that training scripts wrap a state dict in; checked in this order.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")


def read_state_dict(path: str | Path) -> StateDict:
    """Read a PyTorch checkpoint without executing code from it.

    Args:
        path: a ``.pt``/``.pth``/``.bin`` file written by ``torch.save``.

    Returns:
        The flat ``name -> tensor`` dict, unwrapped from ``state_dict``/``model_state_dict`` and with
        a leading ``module.`` (DataParallel) stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated files, non-tensor objects
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    for key in _WRAPPER_KEYS:
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    out: StateDict = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        out[k[len("module.") :] if k.startswith("module.") else k] = v
    return out


def peek_state_dict(path: str | Path) -> int:
    """Open a checkpoint without reading its tensors; returns how many entries it has.

    ``torch.load(mmap=True)`` maps the archive's tensor storage instead of reading it, so a 700 MB
    checkpoint costs page-table entries, not memory. Archives in the legacy (pre-1.6, non-zip)
    format cannot be mapped and are read whole.

    Raises:
        CheckpointError: missing, truncated, not a ``torch.save`` file, or holding code to run.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated files, code in the pickle
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {first}") from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return len(obj)


def _fmt(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names) - limit} more)" if len(names) > limit else "")


def check_state_dict(
    module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str
) -> None:
    """Raise :class:`CheckpointError` listing every missing, unexpected and mis-shaped key."""
    expected = module.state_dict()
    missing = sorted(k for k in expected if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in expected)
    misshaped = sorted(
        f"{k} (checkpoint {tuple(state_dict[k].shape)}, model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    )
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_fmt(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_fmt(unexpected)}")
    if misshaped:
        problems.append(f"shape mismatches ({len(misshaped)}): {_fmt(misshaped)}")
    if problems:
        raise CheckpointError(
            f"checkpoint {source} does not fit {type(module).__name__}:\n  " + "\n  ".join(problems)
        )


def load_checkpoint(
    module: nn.Module,
    path: str | Path,
    convert: Callable[[StateDict], StateDict] | None = None,
) -> nn.Module:
    """Load ``path`` into ``module`` strictly, after an optional pure key conversion.

    Args:
        module: the network, already built with the right configuration.
        path: the checkpoint file.
        convert: the model's converter from the source layout (e.g. ModelScope's) to ours.

    Returns:
        ``module``, loaded and in eval mode.
    """
    sd = read_state_dict(path)
    if convert is not None:
        sd = convert(sd)
    check_state_dict(module, sd, str(path))
    module.load_state_dict(sd, strict=True)
    return module.eval()


def file_version(path: str | Path, length: int = 12) -> str:
    """A short content hash of a checkpoint file, recorded as ``model_version`` in every result row."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]
