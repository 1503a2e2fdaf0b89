"""``--precision`` on every task: the job runs at the precision asked (``auto`` resolved for the
device, with its reason), records it in the summary and in every row's ``model_version``, keeps
its results apart from other precisions' (``--reuse`` and resume never mix them), and refuses what
the device or the model cannot run before any work. Each model's bf16 output against its fp32
output is bounded in ``tests/models/test_precision.py``; here, the masks a job writes at bf16 stay
close to the fp32 job's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vbatch.jobs.cli import main
from vbatch.jobs.demo_data import encode, person_crop, product_image
from vbatch.jobs.publish import read_table
from vbatch.operators.decode import decode_image
from vbatch.operators.storage import Storage


def _manifest(root: Path, make=product_image, n: int = 4) -> str:
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / "imgs" / f"{i}.jpg").write_bytes(encode(make(i, (64, 48))))
    pq.write_table(
        pa.table(
            {"image_id": [f"i{i}" for i in range(n)], "uri": [f"imgs/{i}.jpg" for i in range(n)]}
        ),
        root / "manifest.parquet",
    )
    return str(root / "manifest.parquet")


def _run(tmp_path: Path, name: str, argv: list[str]) -> tuple[int, dict]:
    summary = tmp_path / f"{name}.json"
    code = main([*argv, "--report-samples", "0", "--summary-json", str(summary)])
    return code, json.loads(summary.read_text())


def _masks(out: str) -> dict[str, np.ndarray]:
    return {
        r["image_id"]: decode_image(Path(r["mask_uri"]).read_bytes()).astype(np.int16)
        for r in read_table(out, Storage()).to_pylist()
    }


@pytest.mark.parametrize("task, model", [("salient", "salient_dir"), ("shop-seg", "shop_seg_dir")])
def test_segment_at_bf16_records_it_and_never_mixes_with_fp32(
    request: pytest.FixtureRequest, ray_session, tmp_path: Path, task: str, model: str
) -> None:
    model_dir = str(request.getfixturevalue(model))
    manifest = _manifest(tmp_path / "in")
    out32, out16 = str(tmp_path / "fp32"), str(tmp_path / "bf16")
    job = ["segment", "--task", task, "--manifest", manifest, "--model-dir", model_dir]
    code, fp32 = _run(
        tmp_path, "fp32", [*job, "--out", out32, "--precision", "fp32", "--reuse", out32]
    )
    assert (
        code == 0 and fp32["precision"] == "fp32" and fp32["precision_reason"] == "fp32: requested"
    )
    # bf16, told to reuse the fp32 run: nothing of it is reused (precision decides results)
    code, bf16 = _run(
        tmp_path, "bf16", [*job, "--out", out16, "--precision", "bf16", "--reuse", out32]
    )
    assert code == 0 and bf16["precision"] == "bf16" and bf16["reused_rows"] == 0
    versions = set(read_table(out16, Storage()).column("model_version").to_pylist())
    assert versions == {fp32["model_version"] + "+bf16"}
    # the job's bf16 masks stay close to its fp32 masks (random weights: the loose bound of
    # tests/models/test_precision.py for salient; shop-seg's are binary)
    a, b = _masks(out32), _masks(out16)
    diff = np.concatenate([np.abs(a[k] - b[k]).ravel() for k in a])
    assert diff.mean() <= (4.0 if task == "salient" else 0.05 * 255)


def test_reid_embed_default_is_auto_resolved_for_this_machine(
    ray_session, tmp_path: Path, reid_dir: Path
) -> None:
    from vbatch.models.precision import resolve_precision

    manifest = _manifest(tmp_path / "in", make=lambda i, _s: person_crop(i, i % 2))
    code, record = _run(
        tmp_path,
        "embed",
        [
            "reid",
            "embed",
            "--manifest",
            manifest,
            "--model-dir",
            str(reid_dir),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    expected, reason = resolve_precision("auto", "cpu")  # AMX here: bf16
    assert code == 0 and (record["precision"], record["precision_reason"]) == (expected, reason)
    versions = set(read_table(str(tmp_path / "o"), Storage()).column("model_version").to_pylist())
    assert all(v.endswith("+bf16") == (expected == "bf16") for v in versions)


def test_video_at_bf16(ray_session, tmp_path: Path, rvos_dir: Path) -> None:
    from tests.test_video_job import synthetic_video

    (tmp_path / "in").mkdir()
    synthetic_video(tmp_path / "in" / "clip.mp4", 8, seed=2)
    pq.write_table(
        pa.table({"video_id": ["clip"], "uri": ["clip.mp4"], "queries": [["a ball"]]}),
        tmp_path / "in" / "videos.parquet",
    )
    argv = ["video", "--manifest", str(tmp_path / "in" / "videos.parquet"), "--model-dir",
            str(rvos_dir), "--out", str(tmp_path / "o"), "--precision", "bf16"]  # fmt: skip
    code, record = _run(tmp_path, "video", argv)
    assert code == 0 and record["precision"] == "bf16"
    versions = set(read_table(str(tmp_path / "o"), Storage()).column("model_version").to_pylist())
    assert versions and all(v.endswith("+bf16") for v in versions)


@pytest.mark.parametrize(
    "task, precision, message",
    [("salient", "fp16", "fp16 needs a GPU"), ("matting", "bf16", "runs in fp32 only")],
)
def test_what_cannot_run_is_refused_before_any_work(
    request: pytest.FixtureRequest,
    ray_session,
    tmp_path: Path,
    task: str,
    precision: str,
    message: str,
    capsys,
) -> None:
    model_dir = request.getfixturevalue("salient_dir" if task == "salient" else "matting_dir")
    out = tmp_path / "o"
    argv = ["segment", "--task", task, "--manifest", _manifest(tmp_path / "in"), "--model-dir",
            str(model_dir), "--out", str(out), "--precision", precision, "--device", "cpu"]  # fmt: skip
    code, record = _run(tmp_path, "refused", argv)
    assert code == 1 and record["status"] == "failed"
    assert message in capsys.readouterr().err
    assert not (out / "results").exists()


def test_the_run_key_holds_the_resolved_precision() -> None:
    """A crashed fp32 run is never resumed at bf16: the precision is in the run key."""
    import dataclasses

    from vbatch.jobs.config import key_fields
    from vbatch.jobs.resume import run_key
    from vbatch.jobs.segment import ImageJobConfig

    cfg = ImageJobConfig("salient", "m", "d", "o", precision="fp32")
    assert run_key(key_fields(cfg), [], []) != run_key(
        key_fields(dataclasses.replace(cfg, precision="bf16")), [], []
    )
