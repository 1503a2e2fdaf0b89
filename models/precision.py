"""The one precision table of every vbatch model: ``"fp32"``, ``"bf16"``, ``"fp16"``, and ``"auto"``.

``"fp32"`` runs the network as the reference does (what parity is proven at); ``"bf16"`` and
``"fp16"`` run it under :func:`torch.autocast` with that dtype, the weights staying fp32 (timm's
``--amp-dtype``), except in the few places a model keeps in fp32 (:func:`fp32_island`, each with
its measured reason). The precision is checked against the device once, when a model is loaded, so
that a job fails before its first batch rather than inside an actor.

``"auto"`` (:func:`resolve_precision`) picks bf16 where the device runs it natively — a CPU with
AMX or AVX512-BF16 (read from ``/proc/cpuinfo``), a CUDA device of compute capability >= 8.0 — and
fp32 elsewhere. This module imports torch only inside the functions that need it, so that the CLI
can resolve and print a precision without loading torch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

#: precision name → torch dtype name of its autocast (``None``: no autocast, plain fp32)
DTYPE_NAMES: dict[str, str | None] = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}
PRECISIONS = tuple(DTYPE_NAMES)
#: what a job's ``--precision`` accepts: a precision, or ``"auto"`` (see :func:`resolve_precision`)
PRECISION_CHOICES = (*PRECISIONS, "auto")
#: bytes of one activation element at each precision (autocast halves the activations)
ACTIVATION_BYTES: dict[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2}

#: /proc/cpuinfo flags of native bf16 matrix work, best first: AMX tiles (Sapphire Rapids and
#: later), then AVX512-BF16 dot products (Cooper Lake, Zen 4). oneDNN, which runs torch's CPU bf16
#: convolutions and matmuls, uses them; without either it emulates bf16 and is slower than fp32.
BF16_CPU_FLAGS: dict[str, str] = {"amx_bf16": "AMX", "avx512_bf16": "AVX512-BF16"}
#: CUDA compute capability from which bf16 tensor cores exist (Ampere)
BF16_CUDA_CAPABILITY = (8, 0)


def _device_type(device: Any) -> str:
    """``"cpu"``, ``"cuda"``, … of a ``torch.device`` or a device string such as ``"cuda:1"``."""
    kind = getattr(device, "type", None)
    return str(kind if kind is not None else device).split(":")[0]


def check_precision(precision: str, device: torch.device | str) -> None:
    """Refuse a precision that is unknown or that ``device`` cannot run.

    Args:
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (``"auto"`` must be resolved first, with
            :func:`resolve_precision`).
        device: where the network runs (a ``torch.device`` or its string).

    Raises:
        ValueError: unknown precision; fp16 on the CPU (CPU autocast is meant for bf16); a reduced
            precision on a device other than CPU or CUDA.
    """
    if precision not in DTYPE_NAMES:
        hint = " (resolve 'auto' with resolve_precision first)" if precision == "auto" else ""
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}{hint}")
    kind = _device_type(device)
    if kind == "cpu" and precision == "fp16":
        raise ValueError("fp16 needs a CUDA device; on CPU use precision='fp32' or 'bf16'")
    if kind not in ("cpu", "cuda") and precision != "fp32":
        raise ValueError(f"precision {precision!r} is only supported on CPU and CUDA, not {kind}")


def read_cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str] | None:
    """The feature flags of this machine's CPU, from the first ``flags`` line of ``/proc/cpuinfo``.

    Args:
        cpuinfo: the file to read (a test passes its own).

    Returns:
        The flags, or ``None`` when the file cannot be read (not Linux) or has no ``flags`` line.
    """
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == "flags":
                    return frozenset(value.split())
    except OSError:
        return None
    return None


def cuda_capability(device: torch.device | str) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA device (imports torch)."""
    import torch

    return tuple(torch.cuda.get_device_capability(torch.device(device)))  # type: ignore[return-value]


def resolve_precision(
    requested: str,
    device: torch.device | str,
    *,
    cpu_flags: Iterable[str] | None = None,
    capability: tuple[int, int] | None = None,
) -> tuple[str, str]:
    """The precision a model runs at, and why: ``"auto"`` resolved for ``device``.

    Args:
        requested: ``"fp32"``, ``"bf16"``, ``"fp16"`` (checked against the device and returned as
            asked) or ``"auto"``: bf16 where the device runs it natively, fp32 elsewhere.
        device: the device the model will run on (``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a
            ``torch.device``); a CPU is this machine's CPU, so resolve where the model runs or on
            a machine of the same kind.
        cpu_flags: the CPU's flags (default: read from ``/proc/cpuinfo``); tests inject them.
        capability: the CUDA device's compute capability (default: asked of torch); tests inject it.

    Returns:
        ``(precision, reason)``, e.g. ``("bf16", "bf16: CPU has AMX (amx_bf16)")``; the reason is
        meant for the job's log, summary and ``run.json``.

    Raises:
        ValueError: an unknown name, or a precision the device cannot run (see
            :func:`check_precision`).
    """
    kind = _device_type(device)
    if requested != "auto":
        check_precision(requested, device)
        return requested, f"{requested}: requested"
    if kind == "cpu":
        flags = frozenset(cpu_flags) if cpu_flags is not None else read_cpu_flags()
        if flags is None:
            return (
                "fp32",
                "fp32: CPU flags unreadable (no /proc/cpuinfo), bf16 not known to be native",
            )
        for flag, name in BF16_CPU_FLAGS.items():
            if flag in flags:
                return "bf16", f"bf16: CPU has {name} ({flag})"
        return (
            "fp32",
            f"fp32: CPU has neither {' nor '.join(BF16_CPU_FLAGS)} (bf16 would be emulated)",
        )
    if kind == "cuda":
        cap = tuple(capability) if capability is not None else cuda_capability(device)
        need = ".".join(map(str, BF16_CUDA_CAPABILITY))
        have = ".".join(map(str, cap))
        if cap >= BF16_CUDA_CAPABILITY:
            return "bf16", f"bf16: CUDA compute capability {have} (>= {need}, bf16 tensor cores)"
        return "fp32", f"fp32: CUDA compute capability {have} < {need} (no bf16 tensor cores)"
    return "fp32", f"fp32: no reduced precision on {kind}"


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of ``precision`` (``None`` for fp32)."""
    import torch

    name = DTYPE_NAMES[precision]
    return None if name is None else getattr(torch, name)


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[None]:
    """The context a forward pass runs in: nothing for fp32, else ``torch.autocast`` at that dtype.

    Args:
        precision: a key of :data:`DTYPE_NAMES` (checked by :func:`check_precision` at load).
        device: the network's device (autocast is per device type).

    Returns:
        A context manager.
    """
    import torch

    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def fp32_island(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """A region of a forward pass that runs in fp32 even under :func:`autocast`.

    Autocast casts the inputs of its listed ops (convolutions, matmuls) down, and every other op
    runs at its input's dtype; inside the island nothing is cast, so the caller passes its inputs
    through ``.float()``. Used where a model's part was measured to lose accuracy in bf16 (each
    use says what was measured); outside autocast it changes nothing.

    Args:
        device: the tensors' device.

    Returns:
        A context manager.
    """
    import torch

    if device.type not in ("cpu", "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


#: how far a reduced-precision result may be from the fp32 one (issue 27), per product kind: masks
#: on their 0–255 scale (mean and 99th percentile of |Δ| in grey levels), embeddings by cosine
MASK_MEAN_BOUND = 1.0
MASK_P99_BOUND = 4.0
EMBEDDING_COSINE_BOUND = 0.999


def mask_deviation(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """How far a mask (or 0–255 map) is from the fp32 one.

    Args:
        reference, other: same-shape arrays on the 0–255 scale (uint8 masks or float maps); a list
            of masks is compared as one array.

    Returns:
        ``mean``, ``p99`` and ``max`` of |Δ| in grey levels, and ``iou`` of the masks binarised
        at 128 (1.0 when both are empty).
    """
    import numpy as np

    a = np.asarray(reference, dtype=np.float64)
    b = np.asarray(other, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    d = np.abs(a - b)
    fa, fb = a >= 128, b >= 128
    union = int((fa | fb).sum())
    return {
        "mean": float(d.mean()),
        "p99": float(np.percentile(d, 99)),
        "max": float(d.max()),
        "iou": float((fa & fb).sum() / union) if union else 1.0,
    }


def min_cosine(reference: np.ndarray, other: np.ndarray) -> float:
    """The smallest cosine between matching rows of two (N, E) embedding arrays."""
    import numpy as np

    a = np.asarray(reference, dtype=np.float64)
    b = np.asarray(other, dtype=np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cos.min())
