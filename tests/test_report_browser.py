"""The report in a real browser: headless Chromium (Debian's `chromium`; .ci/run installs it)
opens index.html from disk, renders every image and table, logs no console error, and takes a
screenshot. The page's own load script writes ``data-images="<loaded>/<total> loaded"`` on
``<body>``, read back from the rendered DOM."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.report_data import make_run
from tests.services import missing_service
from vbatch.jobs.report import build_report
from vbatch.operators.storage import Storage


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        exe = shutil.which(name)
        if exe:
            return exe
    return None


CHROMIUM = _chromium()
pytestmark = pytest.mark.browser


@pytest.fixture(autouse=True)
def _chromium_installed() -> None:
    if CHROMIUM is None:
        missing_service("no chromium on PATH (apt-get install chromium; .ci/run installs it in CI)")


def _run(index: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    assert CHROMIUM is not None
    cmd = [
        CHROMIUM, "--headless", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
        # root in a container has no user namespace for the sandbox
        *(["--no-sandbox"] if os.geteuid() == 0 else []),
        f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
        # time for every image to decode and the load event to run the page's script
        "--virtual-time-budget=15000", *extra, index.as_uri(),
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def _console_errors(stderr: str) -> list[str]:
    return [
        line
        for line in stderr.splitlines()
        if ("CONSOLE" in line and ("error" in line.lower() or "Uncaught" in line))
        or "Failed to load resource" in line
    ]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("browser")
    storage = Storage()
    out, _ = make_run(storage, str(root), "salient", n=10, gt=True)
    other, _ = make_run(storage, str(root), "salient", n=10, gt=True, scale_shift=0.2, out_name="b")
    return Path(build_report(out, storage, samples=8, compare=other).index_uri)


def test_every_image_and_table_renders(report: Path, tmp_path: Path) -> None:
    result = _run(report, tmp_path / "profile", "--dump-dom")
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    total = len(re.findall(r"<img\b", dom))
    assert total > 30
    marker = re.search(r'<body[^>]*data-images="(\d+)/(\d+) loaded"', dom)
    assert marker, "the page's load script did not run"
    assert (int(marker.group(1)), int(marker.group(2))) == (total, total)
    assert not re.search(r'<img[^>]*class="[^"]*broken', dom)
    assert len(re.findall(r"<table\b", dom)) >= 5 and "<td>decode</td>" in dom
    assert _console_errors(result.stderr) == []


def test_a_broken_image_is_detected(report: Path, tmp_path: Path) -> None:
    """The check above can fail: with one thumbnail deleted the page counts one image short."""
    copy = tmp_path / "report"
    shutil.copytree(report.parent, copy)
    victim = sorted((copy / "thumbs").iterdir())[0]
    victim.unlink()
    result = _run(copy / "index.html", tmp_path / "profile", "--dump-dom")
    # a row shown in two lists shows the same thumbnail twice
    uses = result.stdout.count(f'src="thumbs/{victim.name}"')
    marker = re.search(r'data-images="(\d+)/(\d+) loaded"', result.stdout)
    assert uses >= 1 and marker and int(marker.group(1)) == int(marker.group(2)) - uses
    assert len(re.findall(r'<img[^>]*class="[^"]*broken', result.stdout)) == uses


def test_screenshot(report: Path, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    result = _run(report, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,3000")
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as img:
        assert img.size == (1280, 3000)
        # a rendered page, not a blank one: many distinct colours (thumbnails, heat-maps)
        assert len(img.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 1000
    keep = os.environ.get("VBATCH_REPORT_SCREENSHOT")
    if keep:  # to look at it: VBATCH_REPORT_SCREENSHOT=/tmp/report.png pytest …
        shutil.copy(shot, keep)
