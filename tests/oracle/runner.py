"""Run a reference script in the oracle environment (ModelScope 1.40.2, its own virtualenv).

The oracle is never imported into the project's environment: a parity test calls one of the scripts
in this folder with the oracle's Python; the script builds the reference model with random weights,
saves it in ModelScope's layout and writes the reference outputs as ``.npz``; the test then loads the
same directory with our code and compares.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.services import missing_service

ORACLE_DIR = Path(__file__).resolve().parent


def oracle_python() -> str:
    """The oracle interpreter; without it a parity test skips, or fails under ``CI`` (which must
    prove parity), unless ``VBATCH_SKIP_PARITY=1`` opts out."""
    py = os.environ.get("VBATCH_ORACLE_PYTHON", "")
    if py and Path(py).exists():
        return py
    if os.environ.get("VBATCH_SKIP_PARITY") == "1":
        pytest.skip("VBATCH_SKIP_PARITY=1: parity against ModelScope not run")
    missing_service(
        "parity tests need the ModelScope oracle environment: run `make test` (it builds "
        ".venv-oracle), or set VBATCH_ORACLE_PYTHON=/path/to/python"
    )
    raise AssertionError("unreachable")


def run_oracle(script: str, *args: str | os.PathLike[str], timeout: float = 1200) -> None:
    """Run ``tests/oracle/<script>`` with the oracle's Python; raise with its output on failure."""
    env = dict(os.environ)
    # the oracle must not pick up the project's packages or TensorFlow by accident (ORACLE.md)
    env.pop("PYTHONPATH", None)
    env.setdefault("USE_TF", "0")
    cmd = [oracle_python(), str(ORACLE_DIR / script), *map(str, args)]
    proc = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"oracle script {script} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}",
        )
    if proc.stdout.strip():
        sys.stdout.write(proc.stdout)
