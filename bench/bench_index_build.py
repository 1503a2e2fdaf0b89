"""Benchmark of the distributed gallery build: wall time and peak memory of every process.

Writes a synthetic re-ID-like gallery (the generator of ``bench/bench_index.py``; default 1M x
1536, 6.1 GB of float32 as Parquet) without ever holding it whole, computing the exact top-10 of
1000 fresh queries on the way. Then builds the index at the automatic choice under a flat/8
budget once per ``--workers`` value (1: in this process, without Ray; N > 1: N shard tasks on a
local Ray plus a training and a merge task) and prints, per build:

* wall time, and the build's own train / add / merge / tune split;
* the peak anonymous (private, heap) memory of the driver and of every Ray worker process by the
  task it ran (sampled from ``/proc/<pid>/smaps_rollup`` every 0.2 s; mapped files are page
  cache and are not counted);
* recall@10 of the fresh queries against exact search through ``GalleryIndex`` (memory-mapped);
* whether the index file and the id map are byte-identical to the first build's.

Run::

    OMP_NUM_THREADS=2 python bench/bench_index_build.py                       # 1M, easy, 1 and 2
    OMP_NUM_THREADS=2 python bench/bench_index_build.py --data near-tied --workers 2
    python bench/bench_index_build.py --vectors 100000 --workers 1,2          # a quick look

Figures: ``docs/BENCHMARKS.md`` ("Distributed build").
"""

from __future__ import annotations

import argparse
import gc
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_index import NEAR_TIED, ReidLikeEmbeddings, gallery_memory, gallery_part, recall_at

from vbatch.operators.index import GalleryIndex
from vbatch.operators.index.store import read_id_map, read_info
from vbatch.operators.storage import Storage


def _anon_bytes(pid: int | str) -> int | None:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    m = re.search(r"^Anonymous:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) * 1024 if m else None


class PeakMemory:
    """Peak anonymous memory of this process and of every Ray worker, by the task it ran."""

    def __init__(self, driver: int, interval: float = 0.2) -> None:
        self.driver, self.interval, self.peaks = driver, interval, defaultdict(int)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            parent: dict[int, int] = {}
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:  # "pid (comm) state ppid ...": comm may hold spaces, so split after ")"
                    stat = Path(f"/proc/{pid}/stat").read_text()
                    parent[int(pid)] = int(stat.rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
            for pid in parent:
                ancestor = pid
                while ancestor not in (self.driver, 0, 1) and ancestor in parent:
                    ancestor = parent[ancestor]
                if ancestor != self.driver:
                    continue  # not the build's driver nor one of its Ray processes
                try:
                    title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
                except OSError:
                    continue
                if pid == self.driver:
                    title = "driver"
                elif not title.startswith("ray::"):
                    continue
                anon = _anon_bytes(pid)
                if anon is not None:
                    key = f"{title.split('.')[0]} (pid {pid})"
                    self.peaks[key] = max(self.peaks[key], anon)
            self._stop.wait(self.interval)


_BUILD_SCRIPT = """
import logging, sys
from vbatch.operators.index import build_index
from vbatch.operators.storage import Storage
logging.basicConfig(level=logging.WARNING)
emb, out, budget, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if workers > 1:
    from vbatch.jobs.runtime import ensure_ray
    ensure_ray("local")
build_index(emb, out, Storage(), memory_budget=budget, workers=workers)
"""


def write_gallery(
    folder: str, gen: ReidLikeEmbeddings, n_ids: int, per_id: int, files: int, xq: np.ndarray
) -> tuple[int, np.ndarray]:
    """Write the gallery file by file; returns (N, exact top-10 ids of ``xq``)."""
    os.makedirs(folder, exist_ok=True)
    ids = np.repeat(np.arange(n_ids), per_id)
    heap = faiss.ResultHeap(len(xq), 10, keep_max=True)
    for f, part in enumerate(np.array_split(np.arange(len(ids)), files)):
        x = gen.draw(ids[part])
        d, i = faiss.knn(xq, x, 10, metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(d, i + part[0])
        pq.write_table(
            gallery_part(x, ids, part, per_id), os.path.join(folder, f"part-{f:03d}.parquet")
        )
        del x
    heap.finalize()
    return len(ids), heap.I


def exact_top10(parts: list[str], xq: np.ndarray) -> np.ndarray:
    """Exact top-10 of ``xq`` over the gallery files (ids = rows in file order), streamed."""
    heap, offset = faiss.ResultHeap(len(xq), 10, keep_max=True), 0
    for f in parts:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=65536, columns=["embedding"]):
            col = batch.column("embedding")
            x = col.values.to_numpy().reshape(len(col), -1)
            d, i = faiss.knn(xq, x, 10, metric=faiss.METRIC_INNER_PRODUCT)
            heap.add_result(d, i + offset)
            offset += len(col)
    heap.finalize()
    return heap.I


def _digest(paths: list[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vectors", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--data", default="easy", choices=["easy", "near-tied"])
    ap.add_argument("--workers", default="1,2", help="comma-separated; 1 = in this process")
    ap.add_argument("--compression", type=float, default=8.0, help="memory budget = flat / this")
    ap.add_argument("--files", type=int, default=20, help="Parquet files of the gallery")
    ap.add_argument("--workdir", default=None)
    ap.add_argument(
        "--keep-index",
        default=None,
        metavar="DIR",
        help="copy the first build's gallery here (e.g. for bench_reid_search.py --index DIR)",
    )
    ap.add_argument(
        "--table",
        default=None,
        help="keep the gallery table (and its exact top-10) in this folder and reuse it next time",
    )
    args = ap.parse_args()
    workers = [int(w) for w in args.workers.split(",")]

    per_id = NEAR_TIED["per_id"] if args.data == "near-tied" else 10
    n_ids = args.vectors // per_id
    if args.data == "near-tied":
        gen = ReidLikeEmbeddings(n_ids, args.dim, view=NEAR_TIED["view"], iso=NEAR_TIED["iso"])
    else:
        gen = ReidLikeEmbeddings(n_ids, args.dim)
    xq = gen.draw(gen.rng.integers(0, n_ids, args.queries))
    tmp = tempfile.mkdtemp(prefix="vbatch-bench-build-", dir=args.workdir)
    try:
        emb = args.table or os.path.join(tmp, "emb")
        t0 = time.perf_counter()
        truth_file = emb.rstrip("/") + "-truth.npy"
        parts = sorted(glob.glob(os.path.join(emb, "part-*.parquet")))
        if parts:  # a kept table: its exact top-10 saved beside it, else computed again
            truth = np.load(truth_file) if os.path.exists(truth_file) else exact_top10(parts, xq)
            n, how = sum(pq.ParquetFile(f).metadata.num_rows for f in parts), "reused"
        else:
            n, truth = write_gallery(emb, gen, n_ids, per_id, args.files, xq)
            how = "written"
        np.save(truth_file, truth)
        del gen  # its identity centres (n_ids x dim) are not the build's memory
        gc.collect()
        print(
            f"{args.data} gallery {n} x {args.dim} ({n * args.dim * 4 / 1e9:.1f} GB float32) "
            f"{how} in {time.perf_counter() - t0:.0f} s, exact top-10 of {len(xq)} queries; "
            f"{os.cpu_count()} cores, OMP threads {faiss.omp_get_max_threads()}"
        )
        budget = int(n * 4 * args.dim / args.compression)
        storage = Storage()
        first: tuple[str, str] | None = None
        for w in workers:
            out = os.path.join(tmp, f"index-w{w}")
            # the build's driver is a fresh process: what the bench itself allocated (the
            # generator, the exact search) is not counted as the build's
            t0 = time.perf_counter()
            child = subprocess.Popen(
                [sys.executable, "-c", _BUILD_SCRIPT, emb, out, str(budget), str(w)],
                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            )
            with PeakMemory(child.pid) as mem:
                if child.wait() != 0:
                    raise SystemExit(f"the build with --workers {w} failed")
            wall = time.perf_counter() - t0
            info = read_info(out, storage)
            ids = read_id_map(info, storage)
            digest = (
                _digest([os.path.join(out, info.index_file)]),
                hashlib.sha256(
                    ids.column("faiss_id").to_numpy().tobytes()
                    + "\n".join(ids.column("image_id").to_pylist()).encode()
                ).hexdigest()[:16],
            )
            del ids
            first = first or digest
            gallery = GalleryIndex.open(out, storage)
            t0 = time.perf_counter()
            _, names = gallery.search(xq, k=10)
            qps = len(xq) / (time.perf_counter() - t0)
            rows = {name: i for i, name in enumerate(gallery.image_ids.to_pylist())}
            found = np.array([[rows.get(x, -1) for x in r] for r in names])
            bs = info.build_seconds
            print(f"\n=== workers={w} ({'in this process' if w == 1 else 'Ray tasks'}) ===")
            print(f"factory        {info.factory}, nprobe {info.nprobe}, rerank {info.rerank}")
            print(
                f"wall           {wall:.0f} s  (train {bs.get('train', 0):.0f}, add "
                f"{bs.get('add', 0):.0f}, merge {bs.get('merge', 0):.0f}, tune "
                f"{bs.get('tune', 0):.0f})"
            )
            print(f"recall@10      {recall_at(found, truth, 10):.4f} vs exact  ({qps:.0f} QPS)")
            print(
                f"identical      index {digest[0] == first[0]}, id map {digest[1] == first[1]} "
                "(to the first build)"
            )
            print("peak anonymous memory by process (MiB):")
            for key, peak in sorted(mem.peaks.items(), key=lambda kv: -kv[1]):
                print(f"  {peak / 2**20:8.0f}  {key}")
            del gallery
            if w == workers[0]:  # opening + searching in a fresh process: mapped vs in RAM
                for mmap in (True, False):
                    m = gallery_memory(out, xq, mmap=mmap)
                    if m is not None:
                        print(
                            f"search process ({'memory-mapped' if mmap else 'read into RAM'}): "
                            f"heap +{m['search_anon'] / 2**20:.0f} MiB, page cache "
                            f"+{m['search_file'] / 2**20:.0f} MiB after open + {len(xq)} queries"
                        )
            if args.keep_index and w == workers[0]:
                shutil.copytree(out, args.keep_index, dirs_exist_ok=True)
            if first is not None and w != workers[0]:
                shutil.rmtree(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
