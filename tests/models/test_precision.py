"""The one precision table: names, autocast dtypes, and the check against the device."""

from __future__ import annotations

import pytest
import torch

from vbatch.models.precision import AUTOCAST_DTYPES, autocast, check_precision

CPU = torch.device("cpu")


def test_table() -> None:
    # fp32 runs without autocast (the reference's numerics); the others autocast at their dtype
    assert AUTOCAST_DTYPES == {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def test_check_against_the_device() -> None:
    check_precision("fp32", CPU)
    check_precision("bf16", CPU)
    check_precision("fp16", torch.device("cuda", 0))  # checked without a GPU: only the type counts
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        check_precision("fp16", CPU)
    with pytest.raises(ValueError, match="precision must be one of"):
        check_precision("int8", CPU)
    with pytest.raises(ValueError, match="only supported on CPU and CUDA"):
        check_precision("bf16", torch.device("meta"))


def test_autocast_runs_at_the_dtype() -> None:
    a = torch.randn(4, 4)
    with autocast("fp32", CPU):
        assert (a @ a).dtype == torch.float32
    with autocast("bf16", CPU):
        assert (a @ a).dtype == torch.bfloat16
