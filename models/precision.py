"""The one precision table of every vbatch model: ``"fp32"``, ``"bf16"``, ``"fp16"``.

``"fp32"`` runs the network as the reference does (what parity is proven at); ``"bf16"`` and
``"fp16"`` run it under :func:`torch.autocast` with that dtype, the weights staying fp32 (timm's
``--amp-dtype``). The precision is checked against the device once, when a model is loaded, so that
a job fails before its first batch rather than inside an actor.
"""

from __future__ import annotations

import contextlib

import torch

#: precision name → autocast dtype (``None``: no autocast, plain fp32)
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
PRECISIONS = tuple(AUTOCAST_DTYPES)


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse a precision that is unknown or that ``device`` cannot run.

    Args:
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        device: where the network runs.

    Raises:
        ValueError: unknown precision; fp16 on the CPU (CPU autocast is meant for bf16); a reduced
            precision on a device other than CPU or CUDA.
    """
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if device.type == "cpu" and precision == "fp16":
        raise ValueError("fp16 needs a CUDA device; on CPU use precision='fp32' or 'bf16'")
    if device.type not in ("cpu", "cuda") and precision != "fp32":
        raise ValueError(
            f"precision {precision!r} is only supported on CPU and CUDA, not {device.type}"
        )


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[None]:
    """The context a forward pass runs in: nothing for fp32, else ``torch.autocast`` at that dtype.

    Args:
        precision: a key of :data:`AUTOCAST_DTYPES` (checked by :func:`check_precision` at load).
        device: the network's device (autocast is per device type).

    Returns:
        A context manager.
    """
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
