"""The distribution installs one namespace, ``vbatch.*``, and runs from any working directory."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vbatch.jobs.demo_data import encode, product_image

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_ROOTS = ("jobs", "operators", "models", "schemas")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # --no-build-isolation: setuptools is already here and nothing can be fetched for a fresh one
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    (whl,) = out.glob("vbatch-*.whl")
    return whl


def test_wheel_holds_only_the_vbatch_namespace(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"vbatch"}, sorted(tops)
    # every source package of the repository is in the wheel, at its vbatch.* name
    for root in PACKAGE_ROOTS:
        for init in (ROOT / root).rglob("__init__.py"):
            rel = init.relative_to(ROOT).as_posix()
            assert f"vbatch/{rel}" in names, f"{rel} missing from the wheel"
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "vbatch = vbatch.jobs.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_package_for_workers_is_a_vbatch_folder() -> None:
    from vbatch.jobs.runtime import package_for_workers

    folder = Path(package_for_workers())
    assert folder.name == "vbatch"
    for root in PACKAGE_ROOTS:
        assert (folder / root / "__init__.py").is_file()
    assert not list(folder.rglob("__pycache__"))


@pytest.mark.ray  # the job starts a Ray of its own, in a subprocess (not the fast tier)
def test_segment_runs_from_a_folder_with_colliding_names(tmp_path: Path) -> None:
    """Ray puts the driver's working directory on the workers' path: empty ``models/`` & co there
    used to shadow the project's packages (``cannot import name 'Predictor' from 'models'``)."""
    from vbatch.models.salient.modeldir import write_random_model_dir

    work = tmp_path / "work"
    for name in PACKAGE_ROOTS:
        (work / name).mkdir(parents=True)
    model_dir = write_random_model_dir(tmp_path / "model", norm_size=(64, 64))
    for i in range(3):
        (work / f"{i}.jpg").write_bytes(encode(product_image(i, (40, 30))))
    pq.write_table(
        pa.table({"image_id": ["a", "b", "c"], "uri": ["0.jpg", "1.jpg", "2.jpg"]}),
        work / "manifest.parquet",
    )
    env = {**os.environ, "PYTHONPATH": ""}
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "vbatch"), "segment", "--task", "salient",
         "--manifest", "manifest.parquet", "--model-dir", str(model_dir), "--out", "out",
],
        cwd=work, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = pq.read_table(work / "out" / "results")
    assert sorted(table["image_id"].to_pylist()) == ["a", "b", "c"]
    assert set(table["status"].to_pylist()) == {"ok"}
