"""Benchmark of the re-ID gallery index: recall vs exact search, memory, QPS and build time.

A synthetic gallery of ``ids x per_id`` 1536-d embeddings (default 20k identities x 10 images =
200k vectors, 1.2 GB as float32) shaped like re-ID embeddings: a common mean direction (features
are not centred), an identity component in a low-dimensional subspace, a view/camera component
shared across identities and isotropic noise, L2-normalised. With the defaults, same-identity
cosine is ~0.56, other identities ~0.11 +- 0.12, and 73 % of a fresh query's exact top-10 are
its own identity (rank-1 98 %): neighbours are clustered but not trivially separated.
``--data near-tied`` draws a gallery of the same size whose identities have 40 nearly identical
images each (view and noise 0.1 instead of 0.8/0.6: one person, one camera, consecutive frames):
a query's exact top-10 are 10 of its identity's 40 at scores a few thousandths apart, which
compact codes cannot order and re-ranking with the full vectors can. ``--data both`` (default)
runs both kinds one after the other.

The gallery is written as an embeddings table (Parquet, like ``reid embed``), indexed with
:func:`vbatch.operators.index.build_index` under a memory budget of ``flat / compression`` bytes,
and searched with fresh queries of gallery identities. Recall is the 10-recall@10 intersection
measure against exact inner-product search (``faiss.knn``), as in faiss' benchmarks.

Run::

    OMP_NUM_THREADS=2 python bench/bench_index.py                            # auto choice, 8x budget
    OMP_NUM_THREADS=2 python bench/bench_index.py --data near-tied --ids 500 # 5k near-tied vectors
    OMP_NUM_THREADS=2 python bench/bench_index.py --factory IVF2048,SQ4      # any other index

Figures: ``docs/BENCHMARKS.md`` ("Re-ID index").
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vbatch.operators.index import GalleryIndex, build_index
from vbatch.operators.storage import Storage


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class ReidLikeEmbeddings:
    """Draws unit vectors of identities (see the module docstring for the model)."""

    def __init__(
        self,
        n_ids: int,
        dim: int,
        seed: int = 0,
        id_latent: int = 16,
        view_latent: int = 64,
        view: float = 0.8,
        iso: float = 0.6,
        mean: float = 0.5,
    ) -> None:
        rng = np.random.default_rng(seed)
        self.rng, self.dim, self.view, self.iso = rng, dim, view, iso
        w = rng.standard_normal((id_latent, dim)).astype(np.float32)
        self.v = rng.standard_normal((view_latent, dim)).astype(np.float32)
        m = _unit(rng.standard_normal((1, dim)).astype(np.float32))
        self.centres = (
            _unit(rng.standard_normal((n_ids, id_latent)).astype(np.float32) @ w) + mean * m
        )

    def draw(self, ids: np.ndarray) -> np.ndarray:
        """(len(ids), dim) float32 unit vectors of the given identities."""
        n = len(ids)
        v = _unit(self.rng.standard_normal((n, self.v.shape[0])).astype(np.float32) @ self.v)
        e = _unit(self.rng.standard_normal((n, self.dim)).astype(np.float32))
        return _unit(self.centres[ids] + self.view * v + self.iso * e).astype(np.float32)


def gallery_part(x: np.ndarray, ids: np.ndarray, part: np.ndarray, per_id: int) -> pa.Table:
    """One file of the gallery's embeddings table: rows ``part`` (identities ``ids[part]``)."""
    return pa.table(
        {
            "image_id": [f"p{ids[i]:06d}_{i % per_id:02d}" for i in part],
            "status": ["ok"] * len(part),
            "error": pa.nulls(len(part), pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1]).cast(
                pa.list_(pa.float32(), x.shape[1])
            ),
            "model_version": ["synthetic-v1"] * len(part),
            "person_id": ids[part],
            "camera_id": (part % 6) + 1,
        }
    )


def write_gallery(
    folder: str, gen: ReidLikeEmbeddings, n_ids: int, per_id: int, files: int
) -> np.ndarray:
    """Write the gallery as an embeddings table; returns the (N, D) vectors in faiss-id order."""
    os.makedirs(folder, exist_ok=True)
    ids = np.repeat(np.arange(n_ids), per_id)
    out = np.empty((len(ids), gen.dim), dtype=np.float32)
    for f, part in enumerate(np.array_split(np.arange(len(ids)), files)):
        x = gen.draw(ids[part])
        out[part] = x
        pq.write_table(
            gallery_part(x, ids, part, per_id), os.path.join(folder, f"part-{f:03d}.parquet")
        )
    return out


_RSS_SCRIPT = """
import re, sys
import numpy as np
import fsspec, pyarrow.dataset, pyarrow.parquet  # imported by the first open: not gallery memory
from vbatch.operators.index import GalleryIndex, read_info
from vbatch.operators.storage import Storage
def mem():
    text = open("/proc/self/smaps_rollup").read()
    kb = lambda k: int(re.search(rf"^{k}:\\s+(\\d+) kB", text, re.M).group(1)) * 1024
    return kb("Anonymous"), kb("Rss") - kb("Anonymous")
queries = np.load(sys.argv[2])
read_info(sys.argv[1], Storage())  # the storage layer's own imports and set-up
a0, f0 = mem()
gallery = GalleryIndex.open(sys.argv[1], Storage(), mmap=sys.argv[3] == "mmap")
a1, f1 = mem()
gallery.search(queries, k=10)
a2, f2 = mem()
print(a1 - a0, f1 - f0, a2 - a0, f2 - f0, gallery.image_ids.nbytes)
"""


def gallery_memory(index_dir: str, queries: np.ndarray, mmap: bool) -> dict[str, int] | None:
    """Memory that opening the gallery (``GalleryIndex.open``: index, id map, refinement
    vectors), then searching ``queries``, adds to a fresh process, from
    ``/proc/self/smaps_rollup``; ``None`` where it is missing.

    ``anon``: anonymous (heap) memory, private to the process (RssAnon); ``file``: file-backed
    resident pages, i.e. the page cache of memory-mapped files, shared between processes and
    evictable. Measured in a subprocess so that memory freed by the build (and reused by the
    allocator) hides nothing.
    """
    if not os.path.exists("/proc/self/smaps_rollup"):
        return None
    qfile = os.path.join(index_dir, "..", "bench-queries.npy")
    np.save(qfile, queries)
    out = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, index_dir, qfile, "mmap" if mmap else "heap"],
        capture_output=True,
        text=True,
        check=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    values = list(map(int, out.stdout.strip().splitlines()[-1].split()))
    keys = ("open_anon", "open_file", "search_anon", "search_file", "ids_arrow")
    return dict(zip(keys, values, strict=True))


def recall_at(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    return float(
        np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(found, truth, strict=True)])
    )


def timed_search(
    gallery: GalleryIndex,
    xq: np.ndarray,
    threads: int,
    nprobe: int | None,
    rerank: int | None = None,
) -> tuple[np.ndarray, float]:
    faiss.omp_set_num_threads(threads)
    t0 = time.perf_counter()
    _, names = gallery.search(xq, k=10, nprobe=nprobe, rerank=rerank)
    qps = len(xq) / (time.perf_counter() - t0)
    rows = {name: i for i, name in enumerate(gallery.image_ids.to_pylist())}
    return np.array([[rows.get(n, -1) for n in r] for r in names]), qps


# near-tied data: the identity's images differ by little more than noise (one person, one
# camera, consecutive frames), so a query's exact top-10 are 10 of ~40 nearly equal vectors
NEAR_TIED = {"view": 0.1, "iso": 0.1, "per_id": 40}


def run(args: argparse.Namespace, kind: str, tmp: str) -> None:
    """Write a gallery of ``kind`` data, index it under the budget, print the figures."""
    threads = faiss.omp_get_max_threads()
    n_total = args.ids * args.per_id
    if kind == "near-tied":
        per_id = NEAR_TIED["per_id"]
        n_ids = n_total // per_id
        gen = ReidLikeEmbeddings(n_ids, args.dim, view=NEAR_TIED["view"], iso=NEAR_TIED["iso"])
    else:
        per_id, n_ids = args.per_id, args.ids
        gen = ReidLikeEmbeddings(n_ids, args.dim)
    emb, index_dir = os.path.join(tmp, kind, "emb"), os.path.join(tmp, kind, "index")
    t0 = time.perf_counter()
    xb = write_gallery(emb, gen, n_ids, per_id, files=10)
    q_ids = gen.rng.integers(0, n_ids, args.queries)
    xq = gen.draw(q_ids)
    n = len(xb)
    print(
        f"\n##### {kind} data: gallery {n} x {args.dim} written in {time.perf_counter() - t0:.1f} s"
    )

    t0 = time.perf_counter()
    scores, truth = faiss.knn(xq, xb, 10, metric=faiss.METRIC_INNER_PRODUCT)
    flat_qps = len(xq) / (time.perf_counter() - t0)
    same = (np.repeat(np.arange(n_ids), per_id)[truth] == q_ids[:, None]).mean()
    gap = float(np.median(scores[:, 0] - scores[:, 9]))
    print(
        f"exact search: {flat_qps:.0f} QPS ({threads} threads); {same:.1%} of the exact "
        f"top-10 share the query's identity; median score gap top-1 - top-10: {gap:.4f}"
    )
    del xb

    flat_bytes = 4 * args.dim
    budget = int(n * flat_bytes / args.compression)
    storage = Storage()
    t0 = time.perf_counter()
    info = build_index(
        emb,
        index_dir,
        storage,
        factory=args.factory,
        memory_budget=budget,
        metric=args.metric,
        refine=None if args.refine == "auto" else args.refine == "on",
        refine_dtype=args.refine_dtype,
    )
    shutil.rmtree(emb)  # the table is no longer needed: disk space for the next kind
    gallery = GalleryIndex.open(index_dir, storage)
    ids_bytes = sum(os.path.getsize(os.path.join(index_dir, p)) for p in info.id_parts)
    refine_bytes = sum(os.path.getsize(os.path.join(index_dir, p)) for p in info.refine_parts)
    mem = gallery_memory(index_dir, xq, mmap=True)

    found, qps_all = timed_search(gallery, xq, threads, None)
    _, qps_one = timed_search(gallery, xq[:200], 1, None)
    codes_only = recall_at(timed_search(gallery, xq, threads, None, rerank=0)[0], truth, 10)
    what = "explicit index" if args.factory else f"auto choice under flat / {args.compression:g}"
    print(f"=== {kind}: {what} ===")
    print(f"factory            {info.factory}  ({info.plan_reason})")
    print(
        f"bytes per vector   {info.bytes_per_vector:.1f} (index file / N; flat = {flat_bytes}) "
        f"-> {flat_bytes / info.bytes_per_vector:.1f}x smaller than flat; id map "
        f"{ids_bytes / n:.1f} B/vector on disk; refinement vectors {refine_bytes / n:.0f} "
        f"B/vector on disk ({info.refine_dtype})"
    )
    if mem is not None:
        print(
            f"gallery memory     open: {mem['open_anon'] / n:.1f} B/vector heap (anonymous) + "
            f"{mem['open_file'] / n:.1f} B/vector page cache; after {len(xq)} queries: "
            f"{mem['search_anon'] / n:.1f} B/vector heap ({mem['search_anon'] / 2**20:.0f} MiB, "
            f"budget {flat_bytes / args.compression:.0f}) + {mem['search_file'] / n:.1f} "
            f"B/vector page cache ({mem['search_file'] / 2**20:.0f} MiB); id map "
            f"{mem['ids_arrow'] / n:.1f} B/vector as Arrow (in the heap figure)"
        )
    print(
        f"tuned              nprobe={info.nprobe} rerank={info.rerank} "
        f"(build-time leave-one-out recall@10 {info.tuned_recall})"
    )
    print(
        f"recall@10          {recall_at(found, truth, 10):.4f}   recall 1@1 "
        f"{float(np.mean(found[:, 0] == truth[:, 0])):.4f}   codes only (rerank=0) "
        f"{codes_only:.4f}   ({len(xq)} fresh queries vs exact)"
    )
    print(f"QPS                {qps_one:.0f} (1 thread)   {qps_all:.0f} ({threads} threads)")
    bs = info.build_seconds
    print(
        f"build time         {bs['total']:.1f} s (train incl. sampling {bs['train']:.1f} s, add "
        f"{bs['add']:.1f} s, tuning {bs['tune']:.1f} s)"
    )
    sweep_nprobe = sorted(
        {max(1, (info.nprobe or 1) // 2), info.nprobe or 1, (info.nprobe or 1) * 2}
    )
    sweep_rerank = [0, 1, 2, 4, 8] if info.refine_parts else [0]
    print("sweep (nprobe x rerank):")
    for nprobe in sweep_nprobe if info.nprobe else [None]:
        for r in sweep_rerank:
            f, qps = timed_search(gallery, xq, threads, nprobe, rerank=r)
            print(
                f"  nprobe={nprobe}  rerank={r}  recall@10 {recall_at(f, truth, 10):.4f}  "
                f"{qps:.0f} QPS"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ids", type=int, default=20_000)
    ap.add_argument("--per-id", type=int, default=10)
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--compression", type=float, default=8.0, help="memory budget = flat / this")
    ap.add_argument("--factory", default=None, help="explicit factory instead of the auto choice")
    ap.add_argument("--metric", default="inner_product", choices=["inner_product", "l2"])
    ap.add_argument(
        "--data",
        default="both",
        choices=["easy", "near-tied", "both"],
        help="easy: the module docstring's identities; near-tied: 40 near-identical images per "
        "identity (same gallery size)",
    )
    ap.add_argument("--refine", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--refine-dtype", default="float32", choices=["float32", "float16"])
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    kinds = ["easy", "near-tied"] if args.data == "both" else [args.data]
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for kind in kinds:
            run(args, kind, tmp)
            shutil.rmtree(os.path.join(tmp, kind))


if __name__ == "__main__":
    main()
