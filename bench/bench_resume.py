"""Benchmark: resume after a killed driver, and one backfill command against separate commands.

``resume``: a salient job over N images (random weights, small input size) runs as its own
``vbatch segment`` process; once about half of the rows are staged the driver's process group is
killed (SIGKILL: no cleanup). The same command is run again; it prints how many rows it took from
the crashed attempt, and how many it ran the model on (rows whose ``processed_at`` is after the
rerun started: resumed rows keep the crashed attempt's).

``backfill``: P partitions of M images, one ``vbatch backfill`` command against P ``vbatch
segment`` commands (wall time of each, every command a fresh process as a scheduler runs it).

    python bench/bench_resume.py resume --images 200
    python bench/bench_resume.py backfill --partitions 10 --images 20
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vbatch.jobs.demo_data import encode, product_image

CLI = [sys.executable, "-m", "vbatch.jobs.cli"]


def write_inputs(root: Path, ids: list[str], name: str = "manifest") -> Path:
    """Images under ``root/imgs/`` and ``root/<name>.parquet`` naming them (relative uris)."""
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    for k, i in enumerate(ids):
        (root / "imgs" / f"{i}.jpg").write_bytes(encode(product_image(k, (160, 120)), quality=90))
    manifest = root / f"{name}.parquet"
    pq.write_table(pa.table({"image_id": ids, "uri": [f"imgs/{i}.jpg" for i in ids]}), manifest)
    return manifest


def model_dir(work: Path) -> Path:
    from vbatch.models.salient.modeldir import write_random_model_dir

    return write_random_model_dir(work / "salient", norm_size=(64, 64))


def staged_rows(out: Path) -> int:
    rows = 0
    for f in (out / ".staging").rglob("*.parquet"):
        try:
            rows += pq.read_metadata(f).num_rows
        except Exception:  # being written
            pass
    return rows


def resume(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="vbatch-resume-"))
    manifest = write_inputs(work / "in", [f"img-{i:04d}" for i in range(args.images)])
    out = work / "out"
    cmd = [*CLI, "segment", "--task", "salient", "--manifest", str(manifest)]
    cmd += ["--model-dir", str(model_dir(work)), "--out", str(out), "--batch-size", "4"]
    cmd += ["--summary-json", "-"]
    proc = subprocess.Popen(
        cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    target = args.images * args.kill_at
    t0 = time.perf_counter()
    while proc.poll() is None and staged_rows(out) < target:
        time.sleep(0.2)
    if proc.poll() is not None:
        raise SystemExit(
            f"the job ended (rc {proc.returncode}) before {target:.0f} rows were staged"
        )
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
    proc.wait()
    killed_after = time.perf_counter() - t0
    staged = staged_rows(out)
    rerun_start = dt.datetime.now(dt.timezone.utc)
    t1 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    rerun_s = time.perf_counter() - t1
    if done.returncode != 0:
        raise SystemExit(f"rerun failed (rc {done.returncode}): {done.stderr[-2000:]}")
    record = json.loads(done.stdout.strip().splitlines()[-1])
    from vbatch.jobs.publish import read_table
    from vbatch.operators.storage import Storage

    table = read_table(str(out), Storage())
    model_rows = pc.sum(
        pc.and_(
            pc.greater_equal(table.column("processed_at"), pa.scalar(rerun_start)),
            pc.equal(table.column("status"), "ok"),
        )
    ).as_py()
    ids = table.column("image_id").to_pylist()
    print(f"images={args.images} killed after {killed_after:.1f} s with {staged} rows staged")
    print(
        f"rerun: resumed_rows={record['resumed_rows']} model rows={model_rows} "
        f"({model_rows / args.images:.0%} of the images), {rerun_s:.1f} s"
    )
    print(
        f"final table: {len(ids)} rows, {len(set(ids))} distinct ids, "
        f"status {record['by_status']}, masks {len(list((out / 'masks').glob('*.png')))}"
    )


def backfill(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="vbatch-backfill-"))
    model = model_dir(work)
    dates = [
        (dt.date(2026, 10, 1) + dt.timedelta(days=d)).isoformat() for d in range(args.partitions)
    ]
    for date in dates:
        write_inputs(work / "in", [f"{date}-{i}" for i in range(args.images)], name=date)
    job = ["segment", "--task", "salient", "--model-dir", str(model), "--batch-size", "4"]
    t0 = time.perf_counter()
    for date in dates:
        subprocess.run(
            CLI
            + job
            + [
                "--manifest",
                str(work / "in" / f"{date}.parquet"),
                "--out",
                str(work / "sep" / date),
            ],
            check=True,
            capture_output=True,
        )
    separate = time.perf_counter() - t0
    backfill = [*CLI, "backfill", "--dates", f"{dates[0]}..{dates[-1]}", "--", *job,
                "--manifest", str(work / "in" / "{date}.parquet"),
                "--out", str(work / "bf" / "{date}")]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(backfill, check=True, capture_output=True)
    one = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run(backfill, check=True, capture_output=True)  # every partition is skipped now
    again = time.perf_counter() - t0
    print(f"partitions={args.partitions} x {args.images} images, cpus={os.cpu_count()}")
    print(f"{args.partitions} separate segment commands: {separate:7.1f} s")
    print(f"one backfill command         : {one:7.1f} s ({separate / one:.2f}x faster)")
    print(f"backfill rerun (all skipped) : {again:7.1f} s")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="what", required=True)
    r = sub.add_parser("resume")
    r.add_argument("--images", type=int, default=200)
    r.add_argument("--kill-at", type=float, default=0.5, help="fraction of rows staged")
    b = sub.add_parser("backfill")
    b.add_argument("--partitions", type=int, default=10)
    b.add_argument("--images", type=int, default=20)
    args = p.parse_args()
    resume(args) if args.what == "resume" else backfill(args)


if __name__ == "__main__":
    main()
