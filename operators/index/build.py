"""Building a gallery index from an embeddings table, and adding a new day to it.

Train once on a uniform sample (k-means on the GPU when faiss has one), encode and add in
streamed batches (in this process, or in shards on Ray workers that :mod:`.shards` merges back
into the same index), tune ``nprobe`` and the re-rank factor on held-out gallery vectors, then
commit a new generation (:mod:`.store`).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from vbatch.operators.index.embeddings import (
    BATCH_ROWS,
    TableStats,
    sample_embeddings,
    scan_embeddings,
)
from vbatch.operators.index.indexes import METRICS, innermost, ivf_or_none, make_index
from vbatch.operators.index.plan import IndexPlan, choose_factory, is_lossy, parse_bytes
from vbatch.operators.index.refine import NpyPartWriter, RefineVectors
from vbatch.operators.index.shards import (
    Shard,
    add_shard,
    append_index,
    empty_like,
    list_sizes,
    plan_shards,
    reserve_lists,
)
from vbatch.operators.index.store import (
    MMAP_FLAGS,
    IndexInfo,
    cached_index_file,
    commit,
    id_part_name,
    index_name,
    load_faiss,
    now_iso,
    read_id_map,
    read_info,
    refine_part_name,
    shard_staging,
    try_read_info,
    vbatch_version,
)
from vbatch.operators.index.tune import (
    DEFAULT_TARGET_RECALL,
    RecallProbe,
    tune_nprobe,
    tune_with_rerank,
)
from vbatch.operators.storage import Storage, is_remote, join

logger = logging.getLogger(__name__)

# k-means points per PQ centroid while training (see _train)
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


def _want_gpu(use_gpu: bool | str) -> bool:
    """``"auto"``: use a GPU when faiss was built with CUDA and sees one."""
    n = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if use_gpu == "auto":
        return n > 0
    if use_gpu and n == 0:
        raise RuntimeError("use_gpu=True but faiss sees no GPU (faiss-cpu build or no device)")
    return bool(use_gpu)


def _train(index: faiss.Index, sample: np.ndarray, gpu: bool) -> None:
    """Train ``index`` on ``sample`` with :data:`TRAIN_THREADS` threads (see there)."""
    with omp_threads(TRAIN_THREADS):
        _train_with(index, sample, gpu)


def _train_with(index: faiss.Index, sample: np.ndarray, gpu: bool) -> None:
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


def _adder(index: faiss.Index, gpu: bool) -> faiss.Index:
    """The index to call ``add`` on: a GPU clone where faiss supports the type, else itself."""
    if not gpu or ivf_or_none(index) is None:
        return index
    if isinstance(innermost(index), faiss.IndexIVFRaBitQ):
        logger.info("adding on CPU: faiss has no GPU RaBitQ index (training used the GPU)")
        return index
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except (RuntimeError, AttributeError) as err:  # e.g. PQ sub-quantizer counts the GPU lacks
        logger.warning("adding on CPU: faiss cannot move %s to the GPU (%s)", type(index), err)
        return index


def _back_to_cpu(index: faiss.Index, adder: faiss.Index) -> faiss.Index:
    return index if adder is index else faiss.index_gpu_to_cpu(adder)


# -- the phases ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Target:
    """What every phase of one build or add needs (small and picklable: shipped to Ray tasks)."""

    storage: Storage
    uri: str
    generation: int
    dim: int
    model_version: str | None
    batch_rows: int
    refine_dtype: str | None  # None: no refinement vectors


@dataclass(frozen=True)
class _Trained:
    """The trained, empty index (serialized) and the held-out queries that tune it."""

    index: bytes
    probe_queries: np.ndarray | None
    probe_ordinals: np.ndarray | None
    seconds: float
    #: OpenMP threads it was trained with (``None``: the index needs no training)
    threads: int | None = None


@dataclass(frozen=True)
class _ShardDone:
    """What a shard task reports back (its files are already in the store)."""

    number: int
    added: int
    probe: tuple[np.ndarray, np.ndarray, np.ndarray] | None
    seconds: float
    #: entries per inverted list of its shard index (IVF only)
    list_sizes: np.ndarray | None = None


def _train_phase(
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
) -> _Trained:
    """Draw the training sample, train, keep ``tune_queries`` of the sample for tuning."""
    t0 = time.perf_counter()
    index = make_index(stats.dim, factory, metric)
    queries = ordinals = None
    threads = None
    if not index.is_trained:
        threads = TRAIN_THREADS
        sample, sample_ordinals = sample_embeddings(
            stats.files, storage, stats.dim, stats.count, n_train, seed, batch_rows
        )
        _train(index, sample, _want_gpu(use_gpu))
        n_q = min(tune_queries, len(sample))
        if want_probe and n_q:
            queries, ordinals = sample[:n_q].copy(), sample_ordinals[:n_q].copy()
        del sample
    data = faiss.serialize_index(index)
    return _Trained(data.tobytes(), queries, ordinals, time.perf_counter() - t0, threads)


def _probe(trained: _Trained) -> RecallProbe | None:
    if trained.probe_queries is None or trained.probe_ordinals is None:
        return None
    return RecallProbe(trained.probe_queries, trained.probe_ordinals)


def _shard_task(target: _Target, trained: _Trained, shard: Shard) -> _ShardDone:
    """A Ray task: encode one shard with the trained index and put its shard index, id part and
    refinement part in the store. Holds one batch of vectors and the shard's codes, never more."""
    t0 = time.perf_counter()
    index = faiss.deserialize_index(np.frombuffer(trained.index, dtype=np.uint8))
    probe = _probe(trained)
    storage = target.storage
    with tempfile.TemporaryDirectory(prefix="vbatch-shard-") as tmp:
        workdir = Path(tmp)
        refine_file = workdir / "refine.npy"
        with contextlib.ExitStack() as stack:
            refine = (
                stack.enter_context(NpyPartWriter(refine_file, target.dim, target.refine_dtype))
                if target.refine_dtype is not None
                else None
            )
            added = add_shard(
                index,
                shard,
                storage,
                target.dim,
                target.batch_rows,
                workdir / "ids.parquet",
                target.model_version,
                probe,
                refine,
            )
        faiss.write_index(index, str(workdir / "shard.faiss"))
        staging = shard_staging(target.uri, target.generation)
        storage.put_file(workdir / "shard.faiss", join(staging, f"shard-{shard.number:05d}.faiss"))
        storage.put_file(
            workdir / "ids.parquet",
            join(target.uri, id_part_name(target.generation, shard.number)),
        )
        if refine is not None:
            storage.put_file(
                refine_file, join(target.uri, refine_part_name(target.generation, shard.number))
            )
    return _ShardDone(
        shard.number,
        added,
        None if probe is None else probe.partial(),
        time.perf_counter() - t0,
        list_sizes(index),
    )


def _tune(
    index: faiss.Index,
    probe: RecallProbe | None,
    refine: RefineVectors | None,
    target_recall: float,
) -> tuple[int | None, int | None, float | None]:
    """``(nprobe, rerank, tuned recall)`` for a freshly built index."""
    ivf = ivf_or_none(index)
    nprobe = tuned = rerank = None
    if refine is not None:
        rerank = 1
        if probe is not None:
            nprobe, rerank, tuned = tune_with_rerank(
                index, probe, None if ivf is None else ivf.nlist, target_recall, refine
            )
        elif ivf is not None:
            nprobe = min(ivf.nlist, 16)
    elif ivf is not None:
        if probe is not None:
            nprobe, tuned = tune_nprobe(index, probe, ivf.nlist, target_recall)
        else:
            nprobe = min(ivf.nlist, 16)
    if ivf is not None:
        ivf.nprobe = nprobe
    return nprobe, rerank, tuned


def _merge_shards(
    dest: faiss.Index,
    target: _Target,
    shards: list[Shard],
    done: list[_ShardDone],
    workdir: Path,
) -> faiss.Index:
    """Append the shard indexes (in shard order) to ``dest``; each is fetched, mapped and
    appended in turn into lists sized once, so the merge holds the merged codes and nothing
    else."""
    sizes = [d.list_sizes for d in done if d.list_sizes is not None]
    if sizes:
        reserve_lists(dest, np.sum(sizes, axis=0))
    staging = shard_staging(target.uri, target.generation)
    for shard in shards:
        if dest.ntotal != shard.first_id:
            raise RuntimeError(
                f"shard {shard.number} starts at faiss id {shard.first_id}, the merge at "
                f"{dest.ntotal}"
            )
        uri = join(staging, f"shard-{shard.number:05d}.faiss")
        local = target.storage.get_file(uri, workdir / "shard.faiss")
        append_index(dest, local)
        local.unlink()
    return dest


def _refine_of(target: _Target, parts: list[str], workdir: Path) -> RefineVectors | None:
    """The refinement parts written by the shards, mapped (fetched first from object storage)."""
    if target.refine_dtype is None:
        return None
    local = []
    for name in parts:
        uri = join(target.uri, name)
        local.append(target.storage.get_file(uri, workdir / name) if is_remote(uri) else Path(uri))
    return RefineVectors(local)


def _build_merge_task(
    target: _Target,
    trained: _Trained,
    shards: list[Shard],
    done: list[_ShardDone],
    info: IndexInfo,
    previous: IndexInfo | None,
    target_recall: float,
    started: float,
) -> IndexInfo:
    """A Ray task: merge, tune and commit a distributed build (``started``: its ``time.time()``)."""
    with tempfile.TemporaryDirectory(prefix="vbatch-merge-") as tmp:
        workdir = Path(tmp)
        t0 = time.perf_counter()
        index = faiss.deserialize_index(np.frombuffer(trained.index, dtype=np.uint8))
        _merge_shards(index, target, shards, done, workdir)
        t_merge = time.perf_counter() - t0
        t0 = time.perf_counter()
        probe = _probe(trained)
        if probe is not None:
            for shard_done in done:
                if shard_done.probe is not None:
                    probe.merge(*shard_done.probe)
        refine = _refine_of(target, info.refine_parts, workdir)
        info.nprobe, info.rerank, tuned = _tune(index, probe, refine, target_recall)
        info.tuned_recall = None if tuned is None else round(tuned, 4)
        del refine
        info.build_seconds["merge"] = round(t_merge, 3)
        info.build_seconds["tune"] = round(time.perf_counter() - t0, 3)
        info.build_seconds["total"] = round(time.time() - started, 3)
        commit(target.storage, index, None, info, previous, workdir)
        return info


def _add_merge_task(
    target: _Target,
    shards: list[Shard],
    done: list[_ShardDone],
    info: IndexInfo,
    previous: IndexInfo,
    started: float,
) -> IndexInfo:
    """A Ray task: append the shards of a ``reid add`` to the gallery and commit."""
    with tempfile.TemporaryDirectory(prefix="vbatch-merge-") as tmp:
        workdir = Path(tmp)
        index = load_faiss(previous, target.storage, workdir)
        _merge_shards(index, target, shards, done, workdir)
        info.history[-1]["seconds"] = round(time.time() - started, 3)
        commit(target.storage, index, None, info, previous, workdir)
        return info


def _emptied(info: IndexInfo, storage: Storage) -> bytes:
    """The gallery's trained index without its vectors, serialized (an IVF gallery is mapped,
    never read into memory, to get it)."""
    with tempfile.TemporaryDirectory(prefix="vbatch-index-") as tmp:
        local = cached_index_file(info, storage, tmp)
        index = faiss.read_index(str(local), MMAP_FLAGS)
        if ivf_or_none(index) is None:  # flat codes: small by the planner's choice; reset needs
            index = faiss.read_index(str(local))  # them owned, not mapped
        return faiss.serialize_index(empty_like(index)).tobytes()


#: Ray worker processes run one build task each, then exit: a task's heap (a training sample,
#: a shard's codes) would otherwise stay with the reused worker, returned to the allocator but not
#: to the system, and count again under the next task it runs (a 1M build's idle worker held
#: 1.1 GB that way). A worker's start-up is a second or two against tasks of minutes.
MAX_CALLS = 1


def _on_ray(fn: Callable[..., Any], *args: Any, num_gpus: float = 0) -> Any:
    """``fn(*args)`` as one Ray task, waited for (one CPU; faiss' threads follow OMP_NUM_THREADS,
    which Ray sets to the task's CPUs)."""
    import ray

    task = ray.remote(num_cpus=1, num_gpus=num_gpus, max_retries=2, max_calls=MAX_CALLS)(fn)
    return ray.get(task.remote(*args))


def _shards_on_ray(target: _Target, trained: _Trained, shards: list[Shard]) -> list[_ShardDone]:
    """Every shard in its own Ray task (Ray retries a task whose worker died: a shard's files are
    rewritten whole, so a retry never duplicates anything)."""
    import ray

    trained_ref = ray.put(trained)
    task = ray.remote(num_cpus=1, max_retries=2, max_calls=MAX_CALLS)(_shard_task)
    refs = [task.remote(target, trained_ref, shard) for shard in shards]
    done = ray.get(refs)
    return sorted(done, key=lambda d: d.number)


def _gpus_for_training(use_gpu: bool | str) -> float:
    """One GPU for the training task when faiss may use one and the cluster has (or can make)
    GPUs; the task itself then checks that faiss sees the device."""
    if use_gpu is False:
        return 0
    from vbatch.jobs.runtime import autoscaler_max_gpus, cluster_gpus

    return 1 if (cluster_gpus() or autoscaler_max_gpus() or 0) > 0 else 0


# -- build / add ----------------------------------------------------------------------------------
def build_index(
    embeddings_uri: str,
    out_uri: str,
    storage: Storage,
    factory: str | None = None,
    memory_budget: int | str | None = None,
    sample_size: int = 100_000,
    add_batch_rows: int = BATCH_ROWS,
    use_gpu: bool | str = "auto",
    target_recall: float = DEFAULT_TARGET_RECALL,
    tune_queries: int = 500,
    seed: int = 0,
    metric: str = "inner_product",
    refine: bool | None = None,
    refine_dtype: str = "float32",
    workers: int = 1,
) -> IndexInfo:
    """Build the gallery index of an embeddings table and write it under ``out_uri``.

    Streaming passes over the Parquet files: count/validate (no embeddings read), the image_ids
    (which rows are indexed, :func:`~.shards.plan_shards`), a uniform training sample (only when
    the index needs training), then the adds. An existing index at ``out_uri`` is replaced (new
    generation), never appended to.

    With ``workers > 1`` the build runs on Ray (:func:`vbatch.jobs.runtime.ensure_ray` first):
    one task trains (on a GPU when the cluster has one), ``workers`` tasks encode contiguous
    shards of the table with that trained index, one task merges the shards' inverted lists, tunes
    and commits. The result is the single-process build's, byte for byte (same codes, same id
    map, same tuned ``nprobe``); no process holds more than one batch of full vectors.

    Args:
        embeddings_uri: Parquet file or folder written by ``reid embed`` (local or ``s3://``).
        out_uri: folder for ``index.json``, the index file and the id map.
        storage: the storage layer (injectable: local paths or an S3 endpoint).
        factory: explicit ``faiss.index_factory`` string; ``None`` chooses one
            (:func:`choose_factory`).
        memory_budget: bytes the index may take in RAM (int or ``"2GB"``); ``None``: no limit.
        sample_size: training vectors at most (100k x 1536-d float32 = 614 MB); IVF nlist is
            capped so that every list gets 39 of them.
        add_batch_rows: Parquet rows per batch while adding (4096 x 1536-d = 25 MB).
        use_gpu: ``"auto"`` (GPU when faiss has one), ``True`` or ``False``.
        target_recall: recall@10 vs exact search that the default ``nprobe`` must reach.
        tune_queries: held-out gallery vectors used to tune ``nprobe``.
        seed: sampling seed (the build is deterministic for a given table and seed).
        metric: ``"inner_product"`` or ``"l2"``; both rank unit vectors identically, but only
            L2 survives a ``PCA`` pre-transform (faiss' PCA centres the data, which changes
            inner products by a per-vector term); search always returns cosine similarities.
        refine: keep the full-precision vectors beside the index (``refine/part-NNNNN.npy``,
            memory-mapped at search time, outside the memory budget) and re-rank the compact
            index's top ``k x r`` with them; ``None``: on for an automatic plan with a lossy
            code, off for an explicit factory. The tuner then picks ``nprobe`` and ``r``.
        refine_dtype: ``"float32"`` (exact re-ranking) or ``"float16"`` (half the disk and
            page cache).
        workers: shards encoded in parallel Ray tasks; 1 builds in this process.

    Returns:
        The committed :class:`IndexInfo` (``added`` = vectors indexed, ``skipped_existing`` =
        duplicate image_ids within the table).
    """
    t_start = time.time()
    stats = scan_embeddings(embeddings_uri, storage)
    if stats.count == 0:
        raise ValueError(f"{embeddings_uri}: no rows with status 'ok' to index")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    budget = parse_bytes(memory_budget)
    n_train = min(stats.count, sample_size)
    if factory is None:
        plan = choose_factory(stats.count, stats.dim, budget, n_train)
    else:
        plan = IndexPlan(factory, None, float("nan"), "explicit factory")
    logger.info(
        "indexing %d vectors (dim %d, model %s) as %s: %s",
        stats.count,
        stats.dim,
        stats.model_version,
        plan.factory,
        plan.reason,
    )
    if refine is None:
        refine = factory is None and is_lossy(plan.factory)
    if refine:
        logger.info("re-ranking with %s vectors kept beside the index", refine_dtype)
    want_probe = (
        bool(refine) or ivf_or_none(make_index(stats.dim, plan.factory, metric)) is not None
    )

    previous = try_read_info(out_uri, storage)
    generation = 0 if previous is None else previous.generation + 1
    shards = plan_shards(stats, storage, max(1, workers))
    target = _Target(
        storage,
        out_uri,
        generation,
        stats.dim,
        stats.model_version,
        add_batch_rows,
        refine_dtype if refine else None,
    )
    train_args = (
        stats,
        storage,
        plan.factory,
        metric,
        n_train,
        seed,
        add_batch_rows,
        use_gpu,
        tune_queries,
        want_probe,
    )
    distributed = workers > 1
    if distributed:
        trained = _on_ray(_train_phase, *train_args, num_gpus=_gpus_for_training(use_gpu))
    else:
        trained = _train_phase(*train_args)
    added = sum(s.added for s in shards)
    skipped = sum(s.skipped for s in shards)
    if skipped:
        logger.warning("%s: %d duplicate image_ids indexed once", embeddings_uri, skipped)
    now = now_iso()
    info = IndexInfo(
        uri=out_uri,
        factory=plan.factory,
        metric=metric,
        dim=stats.dim,
        count=added,
        model_version=stats.model_version,
        nprobe=None,
        tuned_recall=None,
        bytes_per_vector=float("nan"),
        generation=generation,
        index_file=index_name(generation),
        id_parts=[id_part_name(generation, s.number if distributed else None) for s in shards],
        plan_reason=plan.reason,
        memory_budget=budget,
        build_seconds={"train": round(trained.seconds, 3)},
        train_threads=trained.threads,
        created_at=now,
        vbatch_version=vbatch_version(),
        faiss_version=faiss.__version__,
        history=[
            {
                "generation": generation,
                "operation": "build",
                "source": embeddings_uri,
                "added": added,
                "skipped_duplicates": skipped,
                "error_rows": stats.error_rows,
                "workers": len(shards) if distributed else 1,
                "at": now,
            }
        ],
        refine_parts=(
            [refine_part_name(generation, s.number if distributed else None) for s in shards]
            if refine
            else []
        ),
        refine_dtype=refine_dtype if refine else None,
        added=added,
        skipped_existing=skipped,
    )

    t0 = time.perf_counter()
    if distributed:
        done = _shards_on_ray(target, trained, shards)
        info.build_seconds["add"] = round(time.perf_counter() - t0, 3)
        info = _on_ray(
            _build_merge_task,
            target,
            trained,
            shards,
            done,
            info,
            previous,
            target_recall,
            t_start,
        )
    else:
        (shard,) = shards
        with tempfile.TemporaryDirectory(prefix="vbatch-index-") as tmp:
            workdir = Path(tmp)
            index = faiss.deserialize_index(np.frombuffer(trained.index, dtype=np.uint8))
            probe = _probe(trained)
            gpu = _want_gpu(use_gpu)
            adder = _adder(index, gpu)
            refine_file = workdir / "refine.npy" if refine else None
            with contextlib.ExitStack() as stack:
                refine_writer = (
                    stack.enter_context(NpyPartWriter(refine_file, stats.dim, refine_dtype))
                    if refine_file is not None
                    else None
                )
                add_shard(
                    adder,
                    shard,
                    storage,
                    stats.dim,
                    add_batch_rows,
                    workdir / "ids.parquet",
                    stats.model_version,
                    probe,
                    refine_writer,
                )
            index = _back_to_cpu(index, adder)
            info.build_seconds["add"] = round(time.perf_counter() - t0, 3)
            t0 = time.perf_counter()
            refine_vectors = RefineVectors([refine_file]) if refine_file is not None else None
            info.nprobe, info.rerank, tuned = _tune(index, probe, refine_vectors, target_recall)
            info.tuned_recall = None if tuned is None else round(tuned, 4)
            del refine_vectors
            info.build_seconds["tune"] = round(time.perf_counter() - t0, 3)
            info.build_seconds["total"] = round(time.time() - t_start, 3)
            commit(storage, index, workdir / "ids.parquet", info, previous, workdir, refine_file)
    logger.info(
        "index %s: %d vectors, %s, %.0f B/vector, nprobe=%s, rerank=%s (recall@10 %s), %.1f s",
        out_uri,
        info.count,
        info.factory,
        info.bytes_per_vector,
        info.nprobe,
        info.rerank,
        info.tuned_recall,
        info.build_seconds["total"],
    )
    return info


def add_to_index(
    index_uri: str,
    embeddings_uri: str,
    storage: Storage,
    add_batch_rows: int = BATCH_ROWS,
    use_gpu: bool | str = "auto",
    workers: int = 1,
) -> IndexInfo:
    """Add a new table of embeddings to an existing index without retraining.

    IVF coarse centroids, PQ codebooks and OPQ rotations stay as trained; vectors are encoded
    and appended. image_ids already in the index are skipped (a repeated add changes nothing).
    With ``workers > 1``, shards of the new table are encoded in parallel Ray tasks and appended
    by one merge task, as :func:`build_index` does; the result is the single-process add's.

    Args:
        index_uri: folder of an index written by :func:`build_index`.
        embeddings_uri: Parquet file or folder with the new embeddings.
        storage: the storage layer.
        add_batch_rows: Parquet rows per batch.
        use_gpu: ``"auto"``, ``True`` or ``False`` (adds in this process only).
        workers: shards encoded in parallel Ray tasks; 1 adds in this process.

    Returns:
        The new :class:`IndexInfo` (``added``, ``skipped_existing`` say what happened); when
        nothing was new, the unchanged manifest and no new generation.

    Raises:
        ValueError: the new embeddings come from another model version or have another dim.
    """
    t_start = time.time()
    previous = read_info(index_uri, storage)
    stats = scan_embeddings(embeddings_uri, storage)
    if stats.dim != previous.dim:
        raise ValueError(
            f"{embeddings_uri}: embedding dim {stats.dim} does not match the index at "
            f"{index_uri} (dim {previous.dim})"
        )
    if stats.count and stats.model_version != previous.model_version:
        raise ValueError(
            f"{embeddings_uri}: model_version {stats.model_version!r} differs from the index at "
            f"{index_uri} ({previous.model_version!r}); embeddings of different models are not "
            "comparable: build a new index"
        )
    indexed = read_id_map(previous, storage).column("image_id").combine_chunks()
    shards = plan_shards(stats, storage, max(1, workers), indexed=indexed)
    del indexed
    added = sum(s.added for s in shards)
    skipped = stats.count - added
    logger.info(
        "%s: %d new vectors, %d image_ids already indexed (skipped)",
        embeddings_uri,
        added,
        skipped,
    )
    if added == 0:
        info = read_info(index_uri, storage)
        info.skipped_existing = skipped
        return info
    shards = [s for s in shards if s.added]
    generation = previous.generation + 1
    distributed = workers > 1
    # a gallery with refinement vectors gets parts for the new ones (rows continue the faiss
    # ids); one built without stays without (re-ranking needs every vector)
    refine_dtype = (previous.refine_dtype or "float32") if previous.refine_parts else None
    target = _Target(
        storage,
        index_uri,
        generation,
        previous.dim,
        previous.model_version,
        add_batch_rows,
        refine_dtype,
    )
    now = now_iso()
    info = IndexInfo(**{**asdict(previous), "added": added, "skipped_existing": skipped})
    info.count = previous.count + added
    info.generation = generation
    info.index_file = index_name(generation)
    names = [s.number if distributed else None for s in shards]
    info.id_parts = [*previous.id_parts, *(id_part_name(generation, n) for n in names)]
    if refine_dtype is not None:
        info.refine_parts = [
            *previous.refine_parts,
            *(refine_part_name(generation, n) for n in names),
        ]
    info.vbatch_version = vbatch_version()
    info.faiss_version = faiss.__version__
    history = {
        "generation": generation,
        "operation": "add",
        "source": embeddings_uri,
        "added": added,
        "skipped_existing": skipped,
        "error_rows": stats.error_rows,
        "workers": len(shards) if distributed else 1,
        "at": now,
    }
    info.history = [*previous.history, history]
    if distributed:
        trained = _Trained(_emptied(previous, storage), None, None, 0.0)
        done = _shards_on_ray(target, trained, shards)
        return _on_ray(_add_merge_task, target, shards, done, info, previous, t_start)

    (shard,) = shards
    with tempfile.TemporaryDirectory(prefix="vbatch-index-") as tmp:
        workdir = Path(tmp)
        index = load_faiss(previous, storage, workdir)
        refine_file = workdir / "refine-new.npy" if refine_dtype is not None else None
        adder = _adder(index, _want_gpu(use_gpu))
        with contextlib.ExitStack() as stack:
            refine_writer = (
                stack.enter_context(NpyPartWriter(refine_file, previous.dim, refine_dtype))
                if refine_file is not None and refine_dtype is not None
                else None
            )
            add_shard(
                adder,
                shard,
                storage,
                previous.dim,
                add_batch_rows,
                workdir / "ids-new.parquet",
                previous.model_version,
                refine=refine_writer,
            )
        index = _back_to_cpu(index, adder)
        history["seconds"] = round(time.time() - t_start, 3)
        commit(storage, index, workdir / "ids-new.parquet", info, previous, workdir, refine_file)
    return info
