"""Benchmark of reading a large image manifest: driver time and memory, dataset blocks.

Writes a manifest of N rows (``image_id``, ``uri``, one passthrough column; 1 % duplicate ids) as
one Parquet file, starts local Ray and times :func:`vbatch.operators.manifest.read_image_manifest`, which
checks every row (null/empty ids, empty uris, duplicates in manifest order) and cuts the manifest
into dataset blocks. The driver's RSS growth and peak are what the job's driver pays before the
first image is fetched.

    python bench/bench_manifest.py --rows 1000000 [--rows-per-block 32]
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _rss() -> int:
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--rows-per-block", type=int, default=32, help="as the segment job's default")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from vbatch.jobs.runtime import ensure_ray
    from vbatch.operators.manifest import read_image_manifest
    from vbatch.operators.storage import Storage

    n = args.rows
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "manifest.parquet"
        rng = np.random.default_rng(0)
        ids = np.array([f"img-{i:09d}" for i in range(n)], dtype=object)
        dup = rng.choice(n, n // 100, replace=False)
        ids[dup] = ids[rng.integers(0, n, len(dup))]
        uris = [f"s3://catalog/2026/11/23/images/{i:09d}.jpg" for i in range(n)]
        pq.write_table(pa.table({"image_id": ids, "uri": uris, "sku": np.arange(n)}), path)
        del ids, uris

        ensure_ray()
        before = _rss()
        t0 = time.perf_counter()
        ds, info = read_image_manifest(str(path), Storage(), "mask", None, args.rows_per_block)
        seconds = time.perf_counter() - t0
        grown = _rss() - before
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(f"manifest           {n} rows, {info.num_bad_rows} bad (duplicates)")
        print(f"read + check + cut {seconds:.1f} s")
        print(f"driver memory      +{grown / 1e6:.0f} MB RSS (peak RSS {peak / 1e6:.0f} MB)")
        print(f"dataset blocks     {ds.num_blocks()} (~{n / ds.num_blocks():.0f} rows each)")


if __name__ == "__main__":
    main()
