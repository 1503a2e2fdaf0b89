"""The GPU check script is ready to run on a GPU machine: its dry run lists every step within the
time a device call allows, and every script and option it calls exists."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_dry_run_lists_the_steps_within_eight_minutes() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run"],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    names = re.findall(r"^(\S+)\s+≤\s*(\d+) s", out, flags=re.M)
    assert [n for n, _ in names] == [
        "env", "cuda-tests", "salient-e2e", "shop-seg-e2e", "gpu-decode", "shop-seg-probe", "autocast",
        "faiss-gpu", "ort-cuda", "matting-cuda",
    ]  # fmt: skip
    assert sum(int(t) for _, t in names) <= 8 * 60


def test_every_called_script_and_option_exists() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    for step in gpu_check.steps():
        scripts = [Path(a) for a in step.cmd if a.endswith(".py")]
        for script in scripts:
            text = script.read_text()
            for opt in (a for a in step.cmd if a.startswith("--")):
                assert f'"{opt}"' in text, f"{script.name} has no option {opt}"
