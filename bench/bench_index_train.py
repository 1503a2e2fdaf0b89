"""What training with a fixed thread count costs: training time of each factory per OpenMP thread
count, and whether the trained indexes are byte-identical across counts.

The build trains with ``TRAIN_THREADS`` threads wherever it runs (``operators/index``): faiss'
training is not bit-stable across thread counts. Before that, an in-process build trained with the
caller's threads (``OMP_NUM_THREADS``, all cores by default). This trains each factory on the same
re-ID-like sample (the generator of ``bench_index.py``) ``--repeat`` times per thread count, the
counts interleaved, and prints the best and median seconds and whether every trained index was
byte-identical.

Run::

    python bench/bench_index_train.py                                  # 100k x 1536, 1 and 2
    python bench/bench_index_train.py --vectors 20000 --dim 256 --factories 'OPQ32,IVF256,PQ32'

Figures: ``docs/BENCHMARKS.md`` ("Training threads").
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import time

import faiss
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_index import ReidLikeEmbeddings

from vbatch.operators.index.indexes import make_index
from vbatch.operators.index.train import TRAIN_THREADS, _train, omp_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vectors", type=int, default=100_000, help="training sample size")
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument(
        "--factories",
        default="IVF2048,RaBitQ3;IVF2048,SQ8;IVF2048,PQ384",
        help="';'-separated factory strings (the automatic plans of a 200k-1M gallery)",
    )
    parser.add_argument("--threads", default="1,2", help="OpenMP thread counts to compare")
    parser.add_argument("--repeat", type=int, default=2, help="runs per count (best is kept)")
    args = parser.parse_args()

    gen = ReidLikeEmbeddings(max(1, args.vectors // 10), args.dim, seed=0)
    sample = gen.draw(np.repeat(np.arange(max(1, args.vectors // 10)), 10)[: args.vectors])
    print(
        f"sample {sample.shape[0]} x {sample.shape[1]}, {os.cpu_count()} CPUs, "
        f"load {os.getloadavg()[0]:.1f}, TRAIN_THREADS={TRAIN_THREADS}"
    )
    counts = [int(t) for t in args.threads.split(",")]
    header = " ".join(f"{f'{t} thr min/med (s)':>20s}" for t in counts)
    print(f"{'factory':28s} {header}  same bytes")
    for factory in args.factories.split(";"):
        seconds: dict[int, list[float]] = {t: [] for t in counts}
        digests = set()
        for _ in range(args.repeat):  # counts interleaved: a shared machine's load hits each alike
            for threads in counts:
                index = make_index(args.dim, factory)
                t0 = time.perf_counter()
                with omp_threads(threads):
                    _train(index, sample, gpu=False)
                seconds[threads].append(time.perf_counter() - t0)
                digests.add(hashlib.sha256(faiss.serialize_index(index).tobytes()).hexdigest())
        cells = " ".join(
            f"{min(seconds[t]):9.1f} /{statistics.median(seconds[t]):8.1f}" for t in counts
        )
        print(f"{factory:28s} {cells}  {len(digests) == 1}", flush=True)
    print(f"load {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
