"""The train phase: the empty, trained index that every shard encodes with.

A build draws a uniform sample of the table and trains the factory's index on it (k-means on the
GPU when faiss has one), keeping ``tune_queries`` of the sample to tune ``nprobe`` later; an add
trains nothing and encodes with the gallery's own trained index, emptied. Either way the result is
serialized (:class:`Trained`): small, and shipped as it is to the shard tasks.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import faiss
import numpy as np

from vbatch.operators.index.embeddings import TableStats, sample_embeddings
from vbatch.operators.index.indexes import ivf_or_none, make_index
from vbatch.operators.index.node_cache import MMAP_FLAGS, cached_index_file
from vbatch.operators.index.shards import empty_like
from vbatch.operators.index.store import IndexInfo
from vbatch.operators.index.tune import RecallProbe
from vbatch.operators.storage import Storage

# k-means points per PQ centroid while training (see train_index)
PQ_TRAIN_POINTS_PER_CENTROID = 40

#: OpenMP threads every training runs with, wherever it runs (this process, a Ray task): the
#: trained index must be a function of its inputs alone, and faiss' training is not bit-stable
#: across thread counts. OPQ's rotation (LAPACK sgeqrf/sgesvd), random rotations and PCA are
#: reproducible single-threaded only (faiss' own finding, VectorTransform.cpp); and OpenBLAS cuts a
#: product's inner dimension into other blocks with one thread than with several, so k-means
#: distances differ in the last bit for some dims (500, 1000, 1700; not 32 or 1536) and a near-tie
#: can go to another centroid. Recorded in index.json (``train_threads``); what it costs in
#: training time is in docs/BENCHMARKS.md ("Training threads").
TRAIN_THREADS = 1


@contextlib.contextmanager
def omp_threads(n: int) -> Iterator[None]:
    """faiss' OpenMP threads set to ``n`` inside the block, the caller's restored after it."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def want_gpu(use_gpu: bool | str) -> bool:
    """``"auto"``: use a GPU when faiss was built with CUDA and sees one."""
    n = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if use_gpu == "auto":
        return n > 0
    if use_gpu and n == 0:
        raise RuntimeError("use_gpu=True but faiss sees no GPU (faiss-cpu build or no device)")
    return bool(use_gpu)


def train_index(index: faiss.Index, sample: np.ndarray, gpu: bool) -> None:
    """Train ``index`` on ``sample`` (rows: vectors) with :data:`TRAIN_THREADS` threads."""
    with omp_threads(TRAIN_THREADS):
        _train(index, sample, gpu)


def _train(index: faiss.Index, sample: np.ndarray, gpu: bool) -> None:
    ivf = ivf_or_none(index)
    pq = getattr(faiss.downcast_index(ivf if ivf is not None else index), "pq", None)
    if pq is not None:
        # one k-means per sub-quantizer (512 of them for PQ512): faiss' default of 256 points per
        # centroid (65k vectors each) makes training take tens of minutes on 2 cores; 40 points
        # per centroid (just above faiss' own warning threshold of 39) is ~6x faster
        pq.cp.max_points_per_centroid = PQ_TRAIN_POINTS_PER_CENTROID
    if gpu and ivf is not None:
        # k-means dominates training; the faiss idiom is to run its assignment on the GPU
        # (IP flat index: the IVF's k-means is spherical for METRIC_INNER_PRODUCT).
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(
            faiss.IndexFlat(index.d, index.metric_type)
        )
    if isinstance(faiss.downcast_index(index), faiss.IndexIVFRaBitQ):
        # IndexIVF.train is the coarse k-means, then the encoder's training on the residuals of
        # the whole sample: a second copy of it (614 MB at 100k x 1536). RaBitQ's encoder learns
        # nothing from data (faiss 1.15's RaBitQuantizer::train is empty; codes are taken against
        # each list's centroid), so the k-means alone gives the same index, byte for byte
        # (tests/test_index_build.py checks it against faiss' own train), without the copy
        assert ivf is not None
        ivf.train_q1(len(sample), faiss.swig_ptr(sample), False, index.metric_type)
        index.is_trained = True
    else:
        index.train(sample)
    if ivf is not None:
        ivf.clustering_index = None  # never serialized, but do not keep GPU memory alive


@dataclass(frozen=True)
class Trained:
    """The trained, empty index (serialized) and the held-out queries that tune it.

    Attributes:
        index: ``faiss.serialize_index`` of the trained index, without vectors.
        probe_queries: (Q, D) float32 sampled gallery vectors for tuning (``None``: no tuning).
        probe_ordinals: (Q,) int64 their ordinals in the table (leave-one-out).
        threads: OpenMP threads it was trained with (``None``: it needed no training).
    """

    index: bytes
    probe_queries: np.ndarray | None = None
    probe_ordinals: np.ndarray | None = None
    threads: int | None = None

    def load(self) -> faiss.Index:
        return faiss.deserialize_index(np.frombuffer(self.index, dtype=np.uint8))

    def probe(self) -> RecallProbe | None:
        """A fresh probe of the held-out queries (``None`` without them)."""
        if self.probe_queries is None or self.probe_ordinals is None:
            return None
        return RecallProbe(self.probe_queries, self.probe_ordinals)


def train_phase(
    stats: TableStats,
    storage: Storage,
    factory: str,
    metric: str,
    n_train: int,
    seed: int,
    batch_rows: int,
    use_gpu: bool | str,
    tune_queries: int,
    want_probe: bool,
) -> Trained:
    """A build's train phase: draw the training sample, train, keep ``tune_queries`` of the
    sample for tuning (only when ``want_probe``)."""
    index = make_index(stats.dim, factory, metric)
    queries = ordinals = threads = None
    if not index.is_trained:
        sample, sample_ordinals = sample_embeddings(
            stats.files, storage, stats.dim, stats.count, n_train, seed, batch_rows
        )
        train_index(index, sample, want_gpu(use_gpu))
        threads = TRAIN_THREADS
        n_q = min(tune_queries, len(sample))
        if want_probe and n_q:
            queries, ordinals = sample[:n_q].copy(), sample_ordinals[:n_q].copy()
        del sample
    return Trained(faiss.serialize_index(index).tobytes(), queries, ordinals, threads)


def emptied(info: IndexInfo, storage: Storage, scratch: str | None) -> Trained:
    """An add's train phase: the gallery's trained index without its vectors (an IVF gallery is
    mapped, never read into memory, to get it).

    Args:
        info: the gallery's manifest.
        storage: the storage layer.
        scratch: where the gallery's index file may stay for the merge (the in-process executor's
            folder: fetched once); ``None``: a temporary copy.
    """
    with tempfile.TemporaryDirectory(prefix="vbatch-index-") as tmp:
        local = cached_index_file(info, storage, scratch or tmp)
        index = faiss.read_index(str(local), MMAP_FLAGS)
        if ivf_or_none(index) is None:  # flat codes: small by the planner's choice; reset needs
            index = faiss.read_index(str(local))  # them owned, not mapped
        return Trained(faiss.serialize_index(empty_like(index)).tobytes())
