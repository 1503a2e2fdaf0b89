"""Benchmark: `segment` end to end through Ray Data vs the bare network forward.

Prints, for one model on this machine: images/s of the bare forward (preprocessed batches already
in memory, same batch size and torch threads as the actor) and images/s end to end (manifest →
fetch → decode → actor pool → PNG + Parquet), and their ratio. Random weights in ModelScope's
layout; the work per image is the real one.

    python bench/bench_segment.py --task salient --images 96 --batch-size 8
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from jobs.demo_data import SIZES, encode, product_image
from jobs.runtime import decide_resources, ensure_ray
from jobs.segment import SegmentConfig, run_segment
from models import load_model


def write_model(task: str, folder: Path) -> Path:
    if task == "salient":
        from models.salient import write_random_model_dir

        return write_random_model_dir(folder / "salient", variant="senet")
    if task == "shop-seg":
        from models.shop_seg import FULL, write_random_model_dir

        return write_random_model_dir(folder / "shop-seg", config=FULL)
    raise SystemExit(f"no benchmark set-up for {task}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="salient")
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=1, help="end-to-end runs (the best one is reported)")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="vbatch-bench-"))
    images = [product_image(i, SIZES[i % 3]) for i in range(args.images)]  # 640x480, 480x640, 512x512
    (work / "imgs").mkdir()
    for i, img in enumerate(images):
        (work / "imgs" / f"{i}.jpg").write_bytes(encode(img, quality=90))
    pq.write_table(
        pa.table({"image_id": [str(i) for i in range(len(images))], "uri": [f"imgs/{i}.jpg" for i in range(len(images))]}),
        work / "manifest.parquet",
    )
    model_dir = write_model(args.task, work)

    ensure_ray()
    res = decide_resources(args.task, batch_size=args.batch_size)

    # bare forward, same threads and batch size as the actor
    torch.set_num_threads(res.threads)
    predictor = load_model(args.task, model_dir, device=res.device)
    inputs = [predictor.transforms.preprocess(im) for im in images]
    with torch.inference_mode():
        predictor.forward(inputs[: args.batch_size])  # warm-up
        t0 = time.perf_counter()
        for i in range(0, len(inputs), args.batch_size):
            predictor.forward(inputs[i : i + args.batch_size])
        bare = len(inputs) / (time.perf_counter() - t0)
    del predictor

    e2e_runs = []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        summary = run_segment(
            SegmentConfig(args.task, str(work / "manifest.parquet"), str(model_dir), str(work / f"out{r}"), batch_size=args.batch_size)
        )
        assert summary.ok == len(images), summary.report()
        e2e_runs.append(len(images) / (time.perf_counter() - t0))
    e2e = max(e2e_runs)
    cpu = os.cpu_count()
    print(f"task={args.task} images={len(images)} batch={args.batch_size} threads={res.threads} cpus={cpu} device={res.device}")
    print(f"bare forward : {bare:8.2f} images/s")
    print(f"end to end   : {e2e:8.2f} images/s  (runs: {', '.join(f'{x:.2f}' for x in e2e_runs)}; includes actor start-up and model load)")
    print(f"ratio        : {e2e / bare:8.2f}")
    print(f"per image    : bare {1000 / bare:.0f} ms, end to end {1000 / e2e:.0f} ms")
    np.set_printoptions()


if __name__ == "__main__":
    main()
