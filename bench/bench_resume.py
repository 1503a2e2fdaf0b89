"""Benchmark: resume after a killed driver, nightly reuse, and one backfill command against
separate commands.

``resume``: a salient job over N images (random weights, small input size) runs as its own
``vbatch segment`` process; once about half of the rows are staged the driver's process group is
killed (SIGKILL: no cleanup). The same command is run again; it prints how many rows it took from
the crashed attempt, and how many it ran the model on (rows whose ``processed_at`` is after the
rerun started: resumed rows keep the crashed attempt's).

``reuse``: night one runs a salient job over N images (with ``--reuse`` pointing at its own
``--out``, so fingerprints are recorded); then a fraction of the images is rewritten with new
content and night two runs twice over the same manifest: in full (no ``--reuse``) and with
``--reuse`` night one. Prints the wall time and the rows the model ran on of each.

``video``: a ``vbatch video`` job (tiny MTTR, random weights) over V synthetic clips runs as its own
process; once about half of its result rows are staged the driver's process group is killed and the
same command is run again. Prints the windows the crashed attempt staged, and the windows the rerun
decoded and inferred: those whose rows are in the Parquet files the rerun wrote (each frame's row
belongs to the window that owns the frame).

``backfill``: P partitions of M images, one ``vbatch backfill`` command against P ``vbatch
segment`` commands (wall time of each, every command a fresh process as a scheduler runs it).

    python bench/bench_resume.py resume --images 200
    python bench/bench_resume.py reuse --images 1000 --changed 0.02
    python bench/bench_resume.py video --videos 4 --seconds 4
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


def model_dir(work: Path, size: int = 64) -> Path:
    from vbatch.models.salient.modeldir import write_random_model_dir

    return write_random_model_dir(work / "salient", norm_size=(size, size))


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


def _model_rows(out: Path, since: dt.datetime) -> int:
    """Rows of the committed table whose ``processed_at`` is after ``since``: the model ran on them."""
    from vbatch.jobs.publish import read_table
    from vbatch.operators.storage import Storage

    table = read_table(str(out), Storage())
    return int(pc.sum(pc.greater_equal(table.column("processed_at"), pa.scalar(since))).as_py())


def reuse(args: argparse.Namespace) -> None:
    import random

    work = Path(tempfile.mkdtemp(prefix="vbatch-reuse-"))
    ids = [f"img-{i:04d}" for i in range(args.images)]
    manifest = write_inputs(work / "in", ids)
    job = [*CLI, "segment", "--task", "salient", "--manifest", str(manifest)]
    job += ["--model-dir", str(model_dir(work, args.norm_size)), "--summary-json", "-"]
    night1 = work / "night1"

    def run(out: Path, *extra: str) -> tuple[float, dict, int]:
        start = dt.datetime.now(dt.timezone.utc)
        t0 = time.perf_counter()
        done = subprocess.run([*job, "--out", str(out), *extra], capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if done.returncode != 0:
            raise SystemExit(f"{out.name} failed (rc {done.returncode}): {done.stderr[-2000:]}")
        return seconds, json.loads(done.stdout.strip().splitlines()[-1]), _model_rows(out, start)

    first, _, _ = run(night1, "--reuse", str(night1))
    print(f"night one (records fingerprints): {first:7.1f} s", flush=True)
    changed = random.Random(0).sample(range(args.images), round(args.images * args.changed))
    time.sleep(0.01)
    for k in changed:  # new content: new size and mtime
        (work / "in" / "imgs" / f"{ids[k]}.jpg").write_bytes(
            encode(product_image(10_000 + k, (160, 120)), quality=90)
        )
    full_s, full, full_model = run(work / "full")
    print(f"night two in full: {full_s:7.1f} s", flush=True)
    reuse_s, reused, reuse_model = run(work / "reused", "--reuse", str(night1))
    print(
        f"images={args.images}, changed={len(changed)}, norm size {args.norm_size}², cpus={os.cpu_count()}"
    )
    print(f"night one (records fingerprints): {first:7.1f} s")
    print(
        f"night two in full              : {full_s:7.1f} s, model on {full_model} rows, {full['by_status']}"
    )
    print(
        f"night two with --reuse         : {reuse_s:7.1f} s, model on {reuse_model} rows, "
        f"reused_rows={reused['reused_rows']}, {reused['by_status']} ({full_s / reuse_s:.2f}x faster)"
    )


def video(args: argparse.Namespace) -> None:
    import cv2
    import numpy as np

    from vbatch.models.rvos import TINY, owned_frames, plan_windows
    from vbatch.models.rvos.modeldir import write_random_model_dir

    work = Path(tempfile.mkdtemp(prefix="vbatch-video-resume-"))
    (work / "in").mkdir()
    frames = round(args.seconds * 24)
    for v in range(args.videos):  # two shapes moving over noise, 160x120 at 24 fps
        rng = np.random.default_rng(v)
        writer = cv2.VideoWriter(
            str(work / "in" / f"v{v}.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 24, (160, 120)
        )
        bg = rng.integers(0, 80, (120, 160, 3), dtype=np.uint8)
        for t in range(frames):
            frame = bg.copy()
            cv2.circle(frame, ((4 * t) % 160, 60), 20, (0, 0, 230), -1)
            cv2.rectangle(frame, (100, (2 * t) % 120), (130, (2 * t) % 120 + 25), (0, 200, 0), -1)
            writer.write(frame)
        writer.release()
    queries = ["a red ball", "the green box"]
    manifest = work / "in" / "manifest.parquet"
    pq.write_table(
        pa.table(
            {
                "video_id": [f"v{v}" for v in range(args.videos)],
                "uri": [f"v{v}.mp4" for v in range(args.videos)],
                "queries": pa.array([queries] * args.videos, pa.list_(pa.string())),
            }
        ),
        manifest,
    )
    model = write_random_model_dir(work / "rvos", config=TINY)
    out = work / "out"
    cmd = [*CLI, "video", "--manifest", str(manifest), "--model-dir", str(model)]
    cmd += ["--out", str(out), "--summary-json", "-"]
    owned_starts = np.array([a for a, _ in owned_frames(plan_windows(frames))])
    windows = args.videos * len(owned_starts)
    rows = args.videos * frames * len(queries)

    def units(table: pa.Table) -> set[tuple[int, int]]:
        """(manifest row, window) of result rows with a frame: the window owning the frame."""
        t = table.filter(pc.is_valid(table.column("frame_index")))
        found = np.searchsorted(owned_starts, t.column("frame_index").to_numpy(), "right") - 1
        return set(zip(t.column("manifest_row").to_pylist(), found.tolist(), strict=True))

    proc = subprocess.Popen(
        cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    t0 = time.perf_counter()
    while proc.poll() is None and staged_rows(out) < rows * args.kill_at:
        time.sleep(0.2)
    if proc.poll() is not None:
        raise SystemExit(f"the job ended (rc {proc.returncode}) before half its rows were staged")
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
    proc.wait()
    killed_after = time.perf_counter() - t0
    staged: dict[str, pa.Table] = {}
    for f in (out / ".staging").rglob("*.parquet"):
        try:
            staged[f.name] = pq.read_table(f)
        except Exception:  # cut short: the rerun drops it
            pass
    staged_units = set().union(*(units(t) for t in staged.values()))
    t1 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    rerun_s = time.perf_counter() - t1
    if done.returncode != 0:
        raise SystemExit(f"rerun failed (rc {done.returncode}): {done.stderr[-2000:]}")
    record = json.loads(done.stdout.strip().splitlines()[-1])
    generation = out / (out / "_LATEST").read_text().strip()
    files = sorted(generation.glob("*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files])
    rerun_units = units(pa.concat_tables([pq.read_table(f) for f in files if f.name not in staged]))
    keys = table.select(["manifest_row", "query_index", "frame_index"]).to_pylist()
    distinct = len({tuple(k.values()) for k in keys})
    print(
        f"videos={args.videos} x {frames} frames x {len(queries)} queries: {windows} windows, "
        f"{rows} rows; cpus={os.cpu_count()}, load {os.getloadavg()[0]:.1f}"
    )
    print(
        f"killed after {killed_after:.1f} s with {len(staged_units)} windows staged "
        f"({sum(t.num_rows for t in staged.values())} rows)"
    )
    print(
        f"rerun: resumed_rows={record['resumed_rows']}, windows decoded and inferred "
        f"{len(rerun_units)} of {windows} ({len(rerun_units) / windows:.0%}), "
        f"overlap with the staged ones {len(rerun_units & staged_units)}, {rerun_s:.1f} s"
    )
    print(
        f"final table: {table.num_rows} rows, {distinct} distinct (video, query, frame), "
        f"status {record['by_status']}, masks {len(list((out / 'frames').rglob('*.png')))}"
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
    job += ["--report-samples", "0"]  # the same work in every variant: no visual reports
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
    pools = [
        a if a != str(work / "bf" / "{date}") else str(work / "pools" / "{date}") for a in backfill
    ]
    pools.insert(pools.index("--dates"), "--separate")
    t0 = time.perf_counter()
    subprocess.run(pools, check=True, capture_output=True)
    per_partition = time.perf_counter() - t0
    print(f"partitions={args.partitions} x {args.images} images, cpus={os.cpu_count()}")
    print(f"{args.partitions} separate segment commands : {separate:7.1f} s")
    print(
        f"backfill --separate (a pool each): {per_partition:7.1f} s ({separate / per_partition:.2f}x)"
    )
    print(f"backfill, one pipeline and pool  : {one:7.1f} s ({separate / one:.2f}x faster)")
    print(f"backfill rerun (all skipped)     : {again:7.1f} s")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="what", required=True)
    r = sub.add_parser("resume")
    r.add_argument("--images", type=int, default=200)
    r.add_argument("--kill-at", type=float, default=0.5, help="fraction of rows staged")
    u = sub.add_parser("reuse")
    u.add_argument("--images", type=int, default=1000)
    u.add_argument("--changed", type=float, default=0.02, help="fraction of images changed")
    u.add_argument(
        "--norm-size", type=int, default=320, help="salient input size (320: the model card's)"
    )
    v = sub.add_parser("video")
    v.add_argument("--videos", type=int, default=4)
    v.add_argument("--seconds", type=float, default=4.0, help="clip length at 24 fps")
    v.add_argument("--kill-at", type=float, default=0.5, help="fraction of rows staged")
    b = sub.add_parser("backfill")
    b.add_argument("--partitions", type=int, default=10)
    b.add_argument("--images", type=int, default=20)
    args = p.parse_args()
    {"resume": resume, "reuse": reuse, "video": video, "backfill": backfill}[args.what](args)


if __name__ == "__main__":
    main()
