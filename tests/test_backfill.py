"""``vbatch backfill``: partitions by date in one session, each published to its own --out, the
exit code the worst partition's, and a rerun that skips the finished partitions."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vbatch.jobs.backfill import parse_dates, partition_argv, worst_exit
from vbatch.jobs.cli import main
from vbatch.jobs.demo_data import encode, product_image
from vbatch.jobs.publish import read_table
from vbatch.operators.storage import Storage, join
from vbatch.operators.tables import SUCCESS


def test_parse_dates() -> None:
    assert parse_dates("2026-10-30..2026-11-02") == [
        "2026-10-30",
        "2026-10-31",
        "2026-11-01",
        "2026-11-02",
    ]
    assert parse_dates("2026-10-01,2026-10-03") == ["2026-10-01", "2026-10-03"]
    for bad in ("2026-10-02..2026-10-01", "yesterday", "2026-10-01,2026-10-01", ""):
        with pytest.raises(ValueError):
            parse_dates(bad)
    assert partition_argv(["--out", "s3://b/{date}/x"], "2026-10-01") == [
        "--out",
        "s3://b/2026-10-01/x",
    ]
    assert worst_exit([0, 3, 0]) == 3 and worst_exit([3, 1, 0]) == 1 and worst_exit([]) == 0


def _manifest(storage: Storage, root: str, date: str, n: int = 3) -> None:
    ids = [f"{date}-{i}" for i in range(n)]
    for k, i in enumerate(ids):
        storage.write_bytes(join(root, "imgs", f"{i}.jpg"), encode(product_image(k, (40, 32))))
    buf = io.BytesIO()
    pq.write_table(pa.table({"image_id": ids, "uri": [f"imgs/{i}.jpg" for i in ids]}), buf)
    storage.write_bytes(join(root, f"{date}.parquet"), buf.getvalue())


def test_backfill_partitions_and_rerun_skips_finished(
    ray_session, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vbatch.models.salient.modeldir import write_random_model_dir

    model = write_random_model_dir(tmp_path / "salient", norm_size=(64, 64))
    storage = Storage()
    root = str(tmp_path / "in")
    dates = ["2026-10-01", "2026-10-02", "2026-10-03"]
    for date in (dates[0], dates[2]):  # the 2nd day's manifest is not there yet
        _manifest(storage, root, date)
    argv = ["backfill", "--dates", "2026-10-01..2026-10-03", "--summary-json", "-", "--"]
    argv += ["segment", "--task", "salient", "--manifest", f"{root}/{{date}}.parquet"]
    argv += ["--model-dir", str(model), "--out", str(tmp_path / "out" / "{date}")]
    argv += ["--batch-size", "2"]
    assert main(argv) == 1  # one partition failed: the worst exit code
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    by_date = {p["date"]: p for p in summary["partitions"]}
    assert [by_date[d]["exit_code"] for d in dates] == [0, 1, 0]
    assert "manifest" in by_date[dates[1]]["error"]
    for date in (dates[0], dates[2]):
        out = str(tmp_path / "out" / date)
        assert sorted(read_table(out, storage).column("image_id").to_pylist()) == [
            f"{date}-{i}" for i in range(3)
        ]
        assert (Path(out) / SUCCESS).exists()
    assert not (tmp_path / "out" / dates[1] / SUCCESS).exists()
    first_runs = {d: by_date[d]["run_id"] for d in (dates[0], dates[2])}

    _manifest(storage, root, dates[1])
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    by_date = {p["date"]: p for p in summary["partitions"]}
    # the finished partitions were skipped (their tables untouched), the failed one ran
    assert [by_date[d]["skipped"] for d in dates] == [True, False, True]
    assert {d: by_date[d]["run_id"] for d in (dates[0], dates[2])} == first_runs
    assert summary["partitions_by_status"] == {"ok": 1, "skipped": 2}
    assert read_table(str(tmp_path / "out" / dates[1]), storage).num_rows == 3


def test_one_actor_pool_gives_what_separate_runs_give(
    ray_session, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The partitions of a backfill share one pipeline and one actor pool; each partition's table
    and masks are what its own `segment` run writes, in its own --out."""
    from vbatch.models.salient.modeldir import write_random_model_dir

    model = write_random_model_dir(tmp_path / "salient", norm_size=(64, 64))
    storage = Storage()
    root = str(tmp_path / "in")
    dates = ["2026-10-01", "2026-10-02"]
    for n, date in zip((3, 5), dates, strict=True):
        _manifest(storage, root, date, n)
    job = ["segment", "--task", "salient", "--manifest", f"{root}/{{date}}.parquet"]
    job += ["--model-dir", str(model), "--batch-size", "3", "--report-samples", "0"]
    argv = ["backfill", "--dates", ",".join(dates), "--summary-json", "-", "--", *job]
    assert main([*argv, "--out", str(tmp_path / "pooled" / "{date}")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["shared_pool"] is True
    assert [p["rows"] for p in summary["partitions"]] == [3, 5]
    for date in dates:
        alone = str(tmp_path / "alone" / date)
        assert main([*partition_argv(job, date), "--out", alone]) == 0
        pooled = str(tmp_path / "pooled" / date)
        a = read_table(pooled, storage).sort_by("image_id")
        b = read_table(alone, storage).sort_by("image_id")
        assert a.column("image_id").to_pylist() == b.column("image_id").to_pylist()
        assert a.column("status").to_pylist() == ["ok"] * a.num_rows
        for ma, mb in zip(
            a.column("mask_uri").to_pylist(), b.column("mask_uri").to_pylist(), strict=True
        ):
            assert ma.startswith(pooled) and mb.startswith(alone)
            assert Path(ma).read_bytes() == Path(mb).read_bytes()
        assert not list((Path(pooled) / ".staging").glob("*/*.parquet"))
