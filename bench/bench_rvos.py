"""Benchmark of the streaming video job (rvos / MTTR): peak memory per stage and frames/s.

Runs ``vbatch video`` on local Ray over synthetic clips (640x360 at 24 fps by default) while a thread
samples the RSS of every Ray worker process, grouped by what it runs (the Ray process title: the
model actor, the plan/decode/write tasks), and compares end-to-end frames/s with the bare
``predict_window`` loop of the same model on the same machine. Random weights (the model's cost does
not depend on them).

    python bench/bench_rvos.py --config tiny --seconds 10 60 --queries 1 4
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MB = 2**20


def synthetic_clip(path: Path, seconds: float, size: tuple[int, int], fps: int = 24) -> Path:
    """An mp4v clip with moving shapes over a textured background."""
    w, h = size
    rng = np.random.default_rng(0)
    bg = cv2.resize(rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8), (w, h))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    for t in range(int(seconds * fps)):
        frame = bg.copy()
        cv2.circle(frame, ((7 * t) % w, h // 2), h // 6, (0, 0, 230), -1)
        cv2.rectangle(
            frame, (w // 3, (3 * t) % h), (w // 3 + 80, (3 * t) % h + 60), (0, 200, 0), -1
        )
        writer.write(frame)
    writer.release()
    return path


def _rss(pid: int) -> tuple[int, int]:
    """(private, total) resident memory of a process, bytes (Linux /proc; psutil is not a dependency).

    Private = ``RssAnon``: the process's own heap. Total = ``VmRSS`` also counts pages of shared
    files and of Ray's object store (a shared-memory map) that the process has touched, so a worker
    that reads or writes a window's block shows it there while it holds it.
    """
    anon = total = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                anon = int(line.split()[1]) * 1024
            elif line.startswith("VmRSS:"):
                total = int(line.split()[1]) * 1024
    return anon, total


class RssSampler:
    """Samples the RSS of Ray worker processes every ``interval`` s; keeps the peak per role."""

    ROLES = (
        ("actor", re.compile(r"WindowModelStage")),
        ("plan", re.compile(r"plan_video_windows")),
        ("decode", re.compile(r"decode_windows")),
        ("write", re.compile(r"write_window_masks|Write")),
    )

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        #: role -> peak (private, total) bytes
        self.peak: dict[str, tuple[int, int]] = defaultdict(lambda: (0, 0))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._add("driver", _rss(os.getpid()))
            for pid in (int(d) for d in os.listdir("/proc") if d.isdigit()):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        title = f.read().replace(b"\0", b" ").decode(errors="replace")
                    if not title.startswith("ray::"):
                        continue
                    rss = _rss(pid)
                except OSError:  # the process ended
                    continue
                for role, pattern in self.ROLES:
                    if pattern.search(title):
                        self._add(role, rss)
            time.sleep(self.interval)

    def _add(self, role: str, rss: tuple[int, int]) -> None:
        old = self.peak[role]
        self.peak[role] = (max(old[0], rss[0]), max(old[1], rss[1]))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def bare_predict_window(model_dir: Path, video: Path, queries: list[str], windows: int) -> float:
    """frames/s of decode + predict_window alone, in this process, on ``windows`` windows after a warm-up
    (18 new frames per window in steady state, like the job)."""
    import decord
    import torch

    from vbatch.models import load_model
    from vbatch.models.rvos import owned_frames, plan_windows

    torch.set_num_threads(os.cpu_count() or 1)
    predictor = load_model("rvos", model_dir, device="cpu")
    vr = decord.VideoReader(str(video), num_threads=1)
    plan = plan_windows(len(vr))
    s, e = plan[0]
    predictor.predict_window(vr.get_batch(list(range(s, e))).asnumpy(), queries)  # warm-up
    plan = plan[1 : windows + 1]
    frames_done = 0
    started = time.perf_counter()
    for (s, e), (a, b) in zip(plan, owned_frames(plan), strict=True):
        predictor.predict_window(vr.get_batch(list(range(s, e))).asnumpy(), queries)
        frames_done += b - a
    return frames_done / (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", choices=["tiny", "full"], default="tiny")
    ap.add_argument("--seconds", type=float, nargs="+", default=[10.0, 60.0])
    ap.add_argument("--queries", type=int, nargs="+", default=[1])
    ap.add_argument("--size", default="640x360", help="WxH of the synthetic clips")
    ap.add_argument(
        "--bare-windows", type=int, default=3, help="windows timed for bare predict_window"
    )
    args = ap.parse_args()

    import logging

    import ray

    from vbatch.jobs.video import VideoConfig, run_video
    from vbatch.models.rvos import FULL, TINY
    from vbatch.models.rvos.modeldir import write_random_model_dir

    logging.basicConfig(level=logging.WARNING)
    w, h = (int(x) for x in args.size.split("x"))
    work = Path(tempfile.mkdtemp(prefix="bench-rvos-"))
    model_dir = write_random_model_dir(
        work / "model", config=TINY if args.config == "tiny" else FULL
    )
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    all_queries = ["a red ball", "the green box", "the background", "a person riding a bike"]
    print(
        f"rvos {args.config}, clips {w}x{h} @ 24 fps, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"
    )
    print(
        "memory: peak private RSS (RssAnon) / peak total RSS (VmRSS, incl. object-store pages), MB"
    )
    roles = ("actor", "plan", "decode", "write", "driver")
    print(
        f"{'clip':>6} {'frames':>6} {'Q':>2} {'job s':>7} {'frames/s':>8} {'bare f/s':>8} "
        + " ".join(f"{r:>11}" for r in roles)
    )
    for seconds in args.seconds:
        video = synthetic_clip(work / f"clip{int(seconds)}.mp4", seconds, (w, h))
        for nq in args.queries:
            queries = (all_queries * nq)[:nq]
            manifest = work / f"m{int(seconds)}-{nq}.parquet"
            pq.write_table(
                pa.table(
                    {
                        "video_id": ["clip"],
                        "uri": [str(video)],
                        "queries": pa.array([queries], pa.list_(pa.string())),
                    }
                ),
                manifest,
            )
            with RssSampler() as rss:
                summary = run_video(VideoConfig(str(manifest), str(model_dir), str(work / "out")))
            bare = bare_predict_window(model_dir, video, queries, args.bare_windows)
            mem = " ".join(
                f"{f'{rss.peak[r][0] / MB:.0f}/{rss.peak[r][1] / MB:.0f}':>11}" for r in roles
            )
            print(
                f"{seconds:>5g}s {summary.frames:>6} {nq:>2} {summary.seconds:>7.1f} "
                f"{summary.frames_per_second:>8.2f} {bare:>8.2f} {mem}",
                flush=True,
            )
    ray.shutdown()


if __name__ == "__main__":
    main()
