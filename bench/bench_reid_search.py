"""Benchmark of batch re-ID search: the Ray Data job vs bare ``GalleryIndex.search``.

Builds a gallery of synthetic re-ID-like embeddings (``bench_index.ReidLikeEmbeddings``) under a
flat/8 budget (the automatic plan, re-ranking included), writes a table of query embeddings like
``reid embed`` does, then searches every query

* bare: ``GalleryIndex.open`` + ``search`` in blocks of 1024 queries in this process (queries
  already in memory as a numpy array);
* as the job: :func:`vbatch.jobs.reid_search.run_search_job` on a local Ray (read the Parquet,
  search actor, write and commit the hits table).

Queries/s is queries over wall time; the job's includes Ray's start-up of the dataset, the actor's
gallery open and the commit (a fixed cost per job), so its steady state is also estimated from two
job sizes. Run::

    OMP_NUM_THREADS=2 python bench/bench_reid_search.py --gallery 30000 --queries 20000
    # 100k queries: one small warm-up job, then the full job only (no half-size job)
    OMP_NUM_THREADS=2 python bench/bench_reid_search.py --queries 100000 --no-steady
    # against a gallery built before (bench_index_build.py --keep-index DIR: 1M, 100k identities)
    OMP_NUM_THREADS=2 python bench/bench_reid_search.py --index DIR --ids 100000 --queries 100000

Figures: ``docs/BENCHMARKS.md`` ("Batch re-ID search").
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_index import ReidLikeEmbeddings, write_gallery

from vbatch.jobs.reid_search import SearchJobConfig, run_search_job
from vbatch.operators.index import GalleryIndex, build_index
from vbatch.operators.index.store import read_info
from vbatch.operators.storage import Storage


def write_queries(folder: str, x: np.ndarray, files: int = 8) -> None:
    os.makedirs(folder, exist_ok=True)
    dim = x.shape[1]
    for f, part in enumerate(np.array_split(np.arange(len(x)), files)):
        table = pa.table(
            {
                "image_id": [f"q{i:07d}" for i in part],
                "status": ["ok"] * len(part),
                "error": pa.nulls(len(part), pa.string()),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x[part].ravel()), dim),
                "model_version": ["synthetic-v1"] * len(part),
                "camera_id": (part % 6) + 1,
            }
        )
        pq.write_table(table, os.path.join(folder, f"part-{f:03d}.parquet"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gallery", type=int, default=30_000, help="gallery vectors (10 per id)")
    ap.add_argument("--queries", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--workdir", default=None)
    ap.add_argument(
        "--index",
        default=None,
        help="search this gallery (built by bench_index_build.py from the same generator) "
        "instead of building one",
    )
    ap.add_argument(
        "--ids", type=int, default=None, help="identities of the --index gallery (vectors / 10)"
    )
    ap.add_argument(
        "--no-steady",
        action="store_true",
        help="skip the half-size job (the steady-state estimate); warm up on 1000 queries instead",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import ray

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        storage = Storage()
        index = args.index or os.path.join(tmp, "index")
        if args.index:  # the generator with the gallery's identities: queries of the same people
            n_ids = args.ids or read_info(index, storage).count // 10
            gen = ReidLikeEmbeddings(n_ids, args.dim)
            info = read_info(index, storage)
        else:
            n_ids = args.gallery // 10
            gen = ReidLikeEmbeddings(n_ids, args.dim)
            write_gallery(os.path.join(tmp, "gallery"), gen, n_ids, 10, files=4)
            info = build_index(
                os.path.join(tmp, "gallery"),
                index,
                storage,
                memory_budget=args.gallery * args.dim * 4 // 8,
            )
        print(
            f"gallery {info.count} x {args.dim}: {info.factory}, nprobe {info.nprobe}, "
            f"rerank {info.rerank}"
        )
        xq = gen.draw(gen.rng.integers(0, n_ids, args.queries))
        write_queries(os.path.join(tmp, "queries"), xq)
        half = os.path.join(tmp, "queries-half")
        write_queries(half, xq[: args.queries // 2])

        gallery = GalleryIndex.open(index, storage)
        t0 = time.perf_counter()
        for start in range(0, len(xq), 1024):
            gallery.search(xq[start : start + 1024], k=args.k)
        bare = len(xq) / (time.perf_counter() - t0)
        print(f"bare GalleryIndex.search: {bare:.0f} queries/s ({len(xq)} queries, blocks of 1024)")
        del gallery

        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
        ray.data.DataContext.get_current().enable_progress_bars = False
        walls = {}
        jobs = [
            ("warm-up", half, args.queries // 2),
            ("half", half, args.queries // 2),
            ("full", os.path.join(tmp, "queries"), args.queries),
        ]
        if args.no_steady:
            warm = os.path.join(tmp, "queries-warm")
            write_queries(warm, xq[:1000], files=1)
            jobs = [("warm-up", warm, 1000), jobs[2]]
        for name, folder, count in jobs:
            t0 = time.perf_counter()
            summary = run_search_job(
                SearchJobConfig(
                    index=index,
                    out=os.path.join(tmp, f"hits-{name}"),
                    embeddings=folder,
                    k=args.k,
                )
            )
            walls[name] = time.perf_counter() - t0
            assert summary.queries == count and summary.failed == 0
            print(
                f"Ray Data job ({name}): {count} queries in {walls[name]:.1f} s = "
                f"{count / walls[name]:.0f} queries/s end to end"
            )
        if args.no_steady:
            print(f"Ray Data job, end to end: {args.queries / walls['full'] / bare:.2f} of bare")
            return
        steady = (args.queries - args.queries // 2) / (walls["full"] - walls["half"])
        print(
            f"Ray Data job, steady state (marginal rate, half -> full): {steady:.0f} queries/s = "
            f"{steady / bare:.2f} of bare; end to end (full) {args.queries / walls['full'] / bare:.2f}"
            " of bare"
        )


if __name__ == "__main__":
    main()
