"""Building a gallery index from an embeddings table, and adding a new day to it.

Both are one list of phases: plan (which rows, which index, which shards), train (a uniform
sample; or, for an add, the gallery's own trained index), add (encode the shards), then merge,
tune and commit in one process (:mod:`.merge`). An executor runs the phases in this process or as
Ray tasks (:mod:`.executor`); ``workers=1`` and ``workers=N`` share every line but the dispatch,
so a distributed build is the in-process one, byte for byte.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import faiss

from vbatch.operators.index.embeddings import BATCH_ROWS, TableStats, scan_embeddings
from vbatch.operators.index.encode import Target, encode_shard
from vbatch.operators.index.executor import executor_for, timed
from vbatch.operators.index.indexes import METRICS, ivf_or_none, make_index
from vbatch.operators.index.merge import finish
from vbatch.operators.index.plan import IndexPlan, choose_factory, is_lossy, parse_bytes
from vbatch.operators.index.shards import Shard, plan_shards
from vbatch.operators.index.store import (
    IndexInfo,
    index_name,
    now_iso,
    read_id_map,
    read_info,
    try_read_info,
    vbatch_version,
)
from vbatch.operators.index.train import Trained, emptied, train_phase
from vbatch.operators.index.tune import DEFAULT_TARGET_RECALL
from vbatch.operators.storage import Storage

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _BuildPlan:
    """What the plan phase of a build decided (before any vector is read)."""

    stats: TableStats
    index: IndexPlan
    n_train: int
    refine: bool
    want_probe: bool
    previous: IndexInfo | None
    shards: list[Shard]


def _plan_build(
    embeddings_uri: str,
    out_uri: str,
    storage: Storage,
    factory: str | None,
    budget: int | None,
    sample_size: int,
    metric: str,
    refine: bool | None,
    workers: int,
) -> _BuildPlan:
    """Scan the table, choose the index, cut the rows to index into shards."""
    stats = scan_embeddings(embeddings_uri, storage)
    if stats.count == 0:
        raise ValueError(f"{embeddings_uri}: no rows with status 'ok' to index")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
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
    want_probe = refine or ivf_or_none(make_index(stats.dim, plan.factory, metric)) is not None
    shards = plan_shards(stats, storage, max(1, workers))
    skipped = sum(s.skipped for s in shards)
    if skipped:
        logger.warning("%s: %d duplicate image_ids indexed once", embeddings_uri, skipped)
    previous = try_read_info(out_uri, storage)
    return _BuildPlan(stats, plan, n_train, refine, want_probe, previous, shards)


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

    The phases (plan, train, add shards, merge, tune, commit) run in this process, or with
    ``workers > 1`` as Ray tasks (Ray initialised first, e.g. by ``vbatch.jobs.runtime.ensure_ray``):
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
    started = time.time()
    seconds: dict[str, float] = {}
    budget = parse_bytes(memory_budget)
    with timed("plan", seconds):
        plan = _plan_build(
            embeddings_uri, out_uri, storage, factory, budget, sample_size, metric, refine, workers
        )
    if plan.refine:
        logger.info("re-ranking with %s vectors kept beside the index", refine_dtype)
    stats = plan.stats
    with executor_for(workers) as executor:
        target = Target(
            "build",
            storage,
            out_uri,
            0 if plan.previous is None else plan.previous.generation + 1,
            stats.dim,
            stats.model_version,
            add_batch_rows,
            refine_dtype if plan.refine else None,
            sharded=workers > 1,
            use_gpu=use_gpu if executor.gpu_shards else False,
        )
        with timed("train", seconds):
            trained = executor.run(
                train_phase,
                stats,
                storage,
                plan.index.factory,
                metric,
                plan.n_train,
                seed,
                add_batch_rows,
                use_gpu,
                tune_queries,
                plan.want_probe,
                use_gpu=use_gpu,
            )
        with timed("add", seconds):
            done = executor.map(encode_shard, (target, trained, executor.scratch), plan.shards)
        info = _build_info(embeddings_uri, target, plan, trained, metric, budget, seconds)
        info = executor.run(
            finish,
            target,
            trained,
            done,
            info,
            plan.previous,
            started,
            executor.scratch,
            target_recall,
        )
    _log_built(info)
    return info


def _log_built(info: IndexInfo) -> None:
    logger.info(
        "index %s: %d vectors, %s, %.0f B/vector, nprobe=%s, rerank=%s (recall@10 %s), %.1f s",
        info.uri,
        info.count,
        info.factory,
        info.bytes_per_vector,
        info.nprobe,
        info.rerank,
        info.tuned_recall,
        info.build_seconds["total"],
    )


def _build_info(
    source: str,
    target: Target,
    plan: _BuildPlan,
    trained: Trained,
    metric: str,
    budget: int | None,
    seconds: dict[str, float],
) -> IndexInfo:
    """The manifest of a build, before its merge, tuning and commit fill in the rest."""
    stats, shards, generation = plan.stats, plan.shards, target.generation
    added = sum(s.added for s in shards)
    skipped = sum(s.skipped for s in shards)
    now = now_iso()
    refine_parts = [target.refine_part(s.number) for s in shards]
    return IndexInfo(
        uri=target.uri,
        factory=plan.index.factory,
        metric=metric,
        dim=stats.dim,
        count=added,
        model_version=stats.model_version,
        nprobe=None,
        tuned_recall=None,
        bytes_per_vector=float("nan"),
        generation=generation,
        index_file=index_name(generation),
        id_parts=[target.id_part(s.number) for s in shards],
        plan_reason=plan.index.reason,
        memory_budget=budget,
        build_seconds=dict(seconds),
        train_threads=trained.threads,
        created_at=now,
        vbatch_version=vbatch_version(),
        faiss_version=faiss.__version__,
        history=[
            {
                "generation": generation,
                "operation": "build",
                "source": source,
                "added": added,
                "skipped_duplicates": skipped,
                "error_rows": stats.error_rows,
                "workers": len(shards) if target.sharded else 1,
                "at": now,
            }
        ],
        refine_parts=[p for p in refine_parts if p is not None],
        refine_dtype=target.refine_dtype,
        added=added,
        skipped_existing=skipped,
    )


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
    started = time.time()
    seconds: dict[str, float] = {}  # logged; an add's total goes into its history entry
    with timed("plan", seconds):
        previous = read_info(index_uri, storage)
        stats = scan_embeddings(embeddings_uri, storage)
        _check_addable(previous, stats, index_uri, embeddings_uri)
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
        previous.skipped_existing = skipped
        return previous
    shards = [s for s in shards if s.added]
    with executor_for(workers) as executor:
        # a gallery with refinement vectors gets parts for the new ones (rows continue the faiss
        # ids); one built without stays without (re-ranking needs every vector)
        target = Target(
            "add",
            storage,
            index_uri,
            previous.generation + 1,
            previous.dim,
            previous.model_version,
            add_batch_rows,
            (previous.refine_dtype or "float32") if previous.refine_parts else None,
            sharded=workers > 1,
            use_gpu=use_gpu if executor.gpu_shards else False,
        )
        info = _add_info(embeddings_uri, target, previous, shards, stats.error_rows, skipped)
        with timed("train", seconds):
            trained = executor.run(emptied, previous, storage, executor.scratch)
        with timed("add", seconds):
            done = executor.map(encode_shard, (target, trained, executor.scratch), shards)
        return executor.run(
            finish, target, trained, done, info, previous, started, executor.scratch
        )


def _check_addable(
    previous: IndexInfo, stats: TableStats, index_uri: str, embeddings_uri: str
) -> None:
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


def _add_info(
    source: str,
    target: Target,
    previous: IndexInfo,
    shards: list[Shard],
    error_rows: int,
    skipped: int,
) -> IndexInfo:
    """The manifest of an add: the gallery's, with the new generation's files and history."""
    added = sum(s.added for s in shards)
    info = IndexInfo(**{**asdict(previous), "added": added, "skipped_existing": skipped})
    info.count = previous.count + added
    info.generation = target.generation
    info.index_file = index_name(target.generation)
    info.id_parts = [*previous.id_parts, *(target.id_part(s.number) for s in shards)]
    new_refine = [target.refine_part(s.number) for s in shards]
    info.refine_parts = [*previous.refine_parts, *(p for p in new_refine if p is not None)]
    info.vbatch_version = vbatch_version()
    info.faiss_version = faiss.__version__
    history = {
        "generation": target.generation,
        "operation": "add",
        "source": source,
        "added": added,
        "skipped_existing": skipped,
        "error_rows": error_rows,
        "workers": len(shards) if target.sharded else 1,
        "at": now_iso(),
    }
    info.history = [*previous.history, history]
    return info
