"""CPU and GPU installs each resolve to exactly one faiss and one ONNX Runtime, the right ones.

faiss-cpu and faiss-gpu install the same ``faiss`` package over each other, and ONNX Runtime does
not support ``onnxruntime`` next to ``onnxruntime-gpu``: the extras must never put both in one
environment. Checked on the resolved requirements (uv against the package index, no GPU needed).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _uv() -> str:
    uv = Path(sys.executable).parent / "uv"
    if uv.exists():
        return str(uv)
    try:  # the `uv` distribution (which the Makefile installs) knows where its binary is
        from uv import find_uv_bin

        return find_uv_bin()
    except ImportError:
        found = shutil.which("uv")
        if found is None:
            pytest.fail("uv is missing (the Makefile installs it into .venv)")
        return found


def _resolve(*extras: str) -> dict[str, str]:
    cmd = [_uv(), "pip", "compile", str(ROOT / "pyproject.toml"), "--quiet", "--no-header",
           "--python-version", "3.11", "--python-platform", "x86_64-manylinux_2_28"]  # fmt: skip
    for extra in extras:
        cmd += ["--extra", extra]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600).stdout
    pins = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", out, flags=re.M))
    return {k.lower().replace("_", "-"): v for k, v in pins.items()}


def _family(pins: dict[str, str], prefix: str) -> list[str]:
    return sorted(k for k in pins if k == prefix or k.startswith(prefix + "-"))


@pytest.mark.parametrize(
    ("extras", "faiss", "ort"),
    [
        (("cpu",), "faiss-cpu", "onnxruntime"),
        # what `make test` installs
        (("cpu", "dev", "convert", "iceberg"), "faiss-cpu", "onnxruntime"),
        (("gpu",), "faiss-gpu", "onnxruntime-gpu"),
    ],
)
def test_one_faiss_and_one_onnxruntime(extras: tuple[str, ...], faiss: str, ort: str) -> None:
    pins = _resolve(*extras)
    assert _family(pins, "faiss") == [faiss], pins
    assert _family(pins, "onnxruntime") == [ort], pins
    assert "torch" in pins and "ray" in pins
