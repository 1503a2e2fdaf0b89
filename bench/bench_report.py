"""The report's cost on a large run: a synthetic committed results table of N rows (default one
million, the salient task with ground-truth metrics, 0.5 % error rows), with inputs and masks
written only for the rows the report opens; then ``build_report`` in a fresh process.

Prints the wall time, the peak memory (max RSS of that process) and the bytes read (compressed
Parquet column chunks, from the footers; images and masks opened).

    python bench/bench_report.py [--rows 1000000] [--files 10] [--dir /tmp/vbatch-bench-report]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vbatch.jobs.demo_data import encode, product_image
from vbatch.jobs.report.build import DEFAULT_SAMPLES, EXTREMES, choose_rows
from vbatch.jobs.report.data import load_run, read_rows
from vbatch.operators.storage import Storage, join
from vbatch.schemas.images import image_results_schema, metric_fields

RUN_ID = "20261130T000000Z-bench0"


def write_table(out: Path, rows: int, files: int) -> None:
    rng = np.random.default_rng(0)
    schema = pa.schema([*image_results_schema("mask"), *metric_fields("saliency")])
    gen = out / "results" / RUN_ID
    gen.mkdir(parents=True, exist_ok=True)
    names = []
    per = -(-rows // files)
    for f in range(files):
        lo, hi = f * per, min(rows, (f + 1) * per)
        n = hi - lo
        ids = [f"sku-{i:08d}" for i in range(lo, hi)]
        bad = rng.random(n) < 0.005
        classes = np.array(["decode", "not_found", "too_large", "fetch"])[rng.integers(0, 4, n)]
        cols = {
            "image_id": ids,
            "uri": [f"imgs/{i}.jpg" for i in ids],
            "task": ["salient"] * n,
            "status": np.where(bad, "error", "ok").tolist(),
            "error": [
                f"cannot read: {c} problem" if b else None
                for b, c in zip(bad, classes, strict=True)
            ],
            "error_class": [c if b else None for b, c in zip(bad, classes, strict=True)],
            "width": rng.integers(200, 4000, n).astype(np.int32),
            "height": rng.integers(200, 4000, n).astype(np.int32),
            "model_version": ["abc123"] * n,
            "processed_at": pa.array(
                np.full(n, 1_790_000_000_000_000, "datetime64[us]"), pa.timestamp("us", tz="UTC")
            ),
            "mask_uri": [str(out / "masks" / f"{i}.png") for i in ids],
            "foreground_ratio": rng.beta(2, 5, n).astype(np.float32),
            "gt_mae": rng.random(n).astype(np.float32) * 0.2,
            "gt_max_fmeasure": rng.random(n).astype(np.float32),
            "gt_smeasure": rng.random(n).astype(np.float32),
            "gt_mean_emeasure": rng.random(n).astype(np.float32),
            "gt_error": [None] * n,
        }
        table = pa.Table.from_pydict(
            {k: pa.array(v, schema.field(k).type) for k, v in cols.items()}, schema=schema
        )
        name = f"part-{f:05d}.parquet"
        pq.write_table(table, gen / name)
        names.append(name)
    (gen / "_SUCCESS").write_text(json.dumps({"run_id": RUN_ID, "files": names, "rows": rows}))
    (out / "_LATEST").write_text(f"results/{RUN_ID}")
    (out / "run.json").write_text(json.dumps({
        "command": "segment", "run_id": RUN_ID, "status": "ok", "exit_code": 0, "rows": rows,
        "task": "salient", "model_version": "abc123", "images_per_second": 850.0,
        "manifest_files": [str(out / "manifest.parquet")], "config": {"task": "salient"},
    }))  # fmt: skip


def write_products(out: Path) -> int:
    """Inputs and masks of exactly the rows the report opens; returns how many rows."""
    storage = Storage()
    run = load_run(str(out), storage)
    sample, looks, errors = choose_rows(run.light, DEFAULT_SAMPLES, EXTREMES)
    shown = sample + [p for _, ps in looks for p in ps] + errors
    rows, _ = read_rows(run.files, storage, run.light, shown)
    for p, row in rows.items():
        w, h = min(row["width"] or 64, 1600), min(row["height"] or 64, 1600)
        storage.write_bytes(join(str(out), row["uri"]), encode(product_image(p, (w, h))))
        if row["status"] == "ok":
            mask = np.zeros((h, w), np.uint8)
            cv2.circle(mask, (w // 2, h // 2), min(w, h) // 3, 255, -1)
            storage.write_bytes(row["mask_uri"], cv2.imencode(".png", mask)[1].tobytes())
    return len(rows)


CHILD = """
import json, resource, sys, time
t = time.perf_counter()
from vbatch.jobs.report import build_report
from vbatch.operators.storage import Storage
print(json.dumps({"import_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
info = build_report(sys.argv[1], Storage())
print(json.dumps({"seconds": time.perf_counter() - t, "report_seconds": info.seconds,
                  "parquet_bytes": info.parquet_bytes, "rows_opened": info.rows_opened,
                  "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "cpu_seconds": resource.getrusage(resource.RUSAGE_SELF).ru_utime
                  + resource.getrusage(resource.RUSAGE_SELF).ru_stime}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--files", type=int, default=10)
    ap.add_argument("--dir", default="/tmp/vbatch-bench-report")
    args = ap.parse_args()
    out = Path(args.dir)
    if not (out / "_LATEST").exists():
        t = time.perf_counter()
        write_table(out, args.rows, args.files)
        print(f"wrote {args.rows:,} rows in {args.files} files in {time.perf_counter() - t:.1f} s")
        print(f"products for {write_products(out)} rows")
    light = load_run(str(out), Storage()).light
    print(
        f"pass 1 (light columns of every row): {light.bytes_read / 1e6:.1f} MB of column chunks; "
        f"the rest of what the report reads is pass 2 (the shown rows' row groups)"
    )
    table_bytes = sum(f.stat().st_size for f in (out / "results").rglob("*.parquet"))
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(out)], capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )  # fmt: skip
    lines = result.stdout.strip().splitlines()
    figures = json.loads(lines[-1]) | json.loads(lines[-2])
    print(
        f"report of {args.rows:,} rows ({table_bytes / 1e6:.0f} MB of Parquet): "
        f"{figures['report_seconds']:.1f} s to build ({figures['seconds']:.1f} s with imports, "
        f"{figures['cpu_seconds']:.1f} CPU s), peak RSS {figures['max_rss_mb']:.0f} MB (after "
        f"imports: {figures['import_rss_mb']:.0f} MB), {figures['parquet_bytes'] / 1e6:.1f} MB of "
        f"column chunks read, {figures['rows_opened']} rows opened"
    )


if __name__ == "__main__":
    main()
