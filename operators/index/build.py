"""Building a gallery index from an embeddings table, and adding a new day to it.

Train once on a uniform sample (k-means on the GPU when faiss has one), add in streamed batches,
tune ``nprobe`` on held-out gallery vectors, then commit a new generation (:mod:`.store`).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vbatch.operators.index.embeddings import (
    EmbeddingBatch,
    TableStats,
    iter_embeddings,
    sample_embeddings,
    scan_embeddings,
)
from vbatch.operators.index.indexes import METRICS, innermost, ivf_or_none, make_index
from vbatch.operators.index.plan import IndexPlan, choose_factory, is_lossy, parse_bytes
from vbatch.operators.index.refine import NpyPartWriter, RefineVectors
from vbatch.operators.index.store import (
    ID_MAP_SCHEMA,
    IndexInfo,
    commit,
    id_part_name,
    index_name,
    load_faiss,
    now_iso,
    read_id_map,
    read_info,
    refine_part_name,
    try_read_info,
    vbatch_version,
)
from vbatch.operators.index.tune import (
    DEFAULT_TARGET_RECALL,
    RecallProbe,
    tune_nprobe,
    tune_with_rerank,
)
from vbatch.operators.storage import Storage

logger = logging.getLogger(__name__)

# k-means points per PQ centroid while training (see _train)
PQ_TRAIN_POINTS_PER_CENTROID = 40


def _want_gpu(use_gpu: bool | str) -> bool:
    """``"auto"``: use a GPU when faiss was built with CUDA and sees one."""
    n = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if use_gpu == "auto":
        return n > 0
    if use_gpu and n == 0:
        raise RuntimeError("use_gpu=True but faiss sees no GPU (faiss-cpu build or no device)")
    return bool(use_gpu)


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


def _add_stream(
    index: faiss.Index,
    batches: Iterator[EmbeddingBatch],
    writer: pq.ParquetWriter,
    seen: set[str],
    model_version: str | None,
    probe: RecallProbe | None = None,
    refine: NpyPartWriter | None = None,
) -> tuple[int, int]:
    """Add every batch whose image_id is new; write its id map rows and, with ``refine``, its
    full-precision vectors (rows in faiss-id order). Returns (added, skipped)."""
    added = skipped = 0
    for batch in batches:
        ids = batch.image_ids.to_pylist()
        keep = np.ones(len(ids), dtype=bool)
        for i, image_id in enumerate(ids):
            if image_id in seen:
                keep[i] = False
            else:
                seen.add(image_id)
        skipped += int((~keep).sum())
        if not keep.any():
            continue
        vectors = batch.vectors[keep]
        first = index.ntotal
        faiss_ids = np.arange(first, first + len(vectors), dtype=np.int64)
        index.add(vectors)
        if refine is not None:
            refine.write(vectors)
        if probe is not None:
            probe.observe(vectors, faiss_ids, batch.ordinals[keep])
        writer.write_table(
            pa.table(
                {
                    "faiss_id": faiss_ids,
                    "image_id": batch.image_ids.filter(pa.array(keep)),
                    "model_version": pa.array([model_version] * len(vectors), pa.string()),
                },
                schema=ID_MAP_SCHEMA,
            )
        )
        added += len(vectors)
        logger.debug("added %d vectors (%d in total)", len(vectors), index.ntotal)
    return added, skipped


class _LazySample:
    """The training sample, drawn on first use."""

    def __init__(
        self, stats: TableStats, storage: Storage, size: int, seed: int, batch_rows: int
    ) -> None:
        self._args = (stats.files, storage, stats.dim, stats.count, size, seed, batch_rows)
        self._sample: tuple[np.ndarray, np.ndarray] | None = None

    def get(self) -> tuple[np.ndarray, np.ndarray]:
        if self._sample is None:
            self._sample = sample_embeddings(*self._args)
        return self._sample

    def release(self) -> None:
        self._sample = None


# -- build / add ----------------------------------------------------------------------------------
def build_index(
    embeddings_uri: str,
    out_uri: str,
    storage: Storage,
    factory: str | None = None,
    memory_budget: int | str | None = None,
    sample_size: int = 100_000,
    add_batch_rows: int = 16_384,
    use_gpu: bool | str = "auto",
    target_recall: float = DEFAULT_TARGET_RECALL,
    tune_queries: int = 500,
    seed: int = 0,
    metric: str = "inner_product",
    refine: bool | None = None,
    refine_dtype: str = "float32",
) -> IndexInfo:
    """Build the gallery index of an embeddings table and write it under ``out_uri``.

    Three streaming passes over the Parquet files: count/validate (no embeddings read), draw a
    uniform training sample (only when the index needs training), add in batches. An existing
    index at ``out_uri`` is replaced (new generation), never appended to.

    Args:
        embeddings_uri: Parquet file or folder written by ``reid embed`` (local or ``s3://``).
        out_uri: folder for ``index.json``, the index file and the id map.
        storage: the storage layer (injectable: local paths or an S3 endpoint).
        factory: explicit ``faiss.index_factory`` string; ``None`` chooses one
            (:func:`choose_factory`).
        memory_budget: bytes the index may take in RAM (int or ``"2GB"``); ``None``: no limit.
        sample_size: training vectors at most (100k x 1536-d float32 = 614 MB); IVF nlist is
            capped so that every list gets 39 of them.
        add_batch_rows: Parquet rows per batch while adding (16k x 1536-d = 100 MB).
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

    Returns:
        The committed :class:`IndexInfo` (``added`` = vectors indexed, ``skipped_existing`` =
        duplicate image_ids within the table).
    """
    t_start = time.perf_counter()
    stats = scan_embeddings(embeddings_uri, storage)
    if stats.count == 0:
        raise ValueError(f"{embeddings_uri}: no rows with status 'ok' to index")
    budget = parse_bytes(memory_budget)
    n_train = min(stats.count, sample_size)
    sampler = _LazySample(stats, storage, n_train, seed, add_batch_rows)
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
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    index = make_index(stats.dim, plan.factory, metric)
    gpu = _want_gpu(use_gpu)
    if refine is None:
        refine = factory is None and is_lossy(plan.factory)
    if refine:
        logger.info("re-ranking with %s vectors kept beside the index", refine_dtype)

    t0 = time.perf_counter()
    probe = None
    if not index.is_trained:
        sample, ordinals = sampler.get()
        _train(index, sample, gpu)
        n_q = min(tune_queries, len(sample))
        if (refine or ivf_or_none(index) is not None) and n_q:
            probe = RecallProbe(sample[:n_q].copy(), ordinals[:n_q])
        del sample
        sampler.release()
    t_train = time.perf_counter() - t0

    previous = try_read_info(out_uri, storage)
    generation = 0 if previous is None else previous.generation + 1
    with tempfile.TemporaryDirectory(prefix="vbatch-index-") as tmp:
        workdir = Path(tmp)
        t0 = time.perf_counter()
        adder = _adder(index, gpu)
        refine_file = workdir / "refine.npy" if refine else None
        with contextlib.ExitStack() as stack:
            writer = stack.enter_context(pq.ParquetWriter(workdir / "ids.parquet", ID_MAP_SCHEMA))
            refine_writer = (
                stack.enter_context(NpyPartWriter(refine_file, stats.dim, refine_dtype))
                if refine_file is not None
                else None
            )
            added, skipped = _add_stream(
                adder,
                iter_embeddings(stats.files, storage, stats.dim, add_batch_rows),
                writer,
                set(),
                stats.model_version,
                probe,
                refine_writer,
            )
        index = _back_to_cpu(index, adder)
        t_add = time.perf_counter() - t0
        if skipped:
            logger.warning("%s: %d duplicate image_ids indexed once", embeddings_uri, skipped)

        t0 = time.perf_counter()
        nprobe = tuned = rerank = None
        ivf = ivf_or_none(index)
        if refine_file is not None:
            rerank = 1
            if probe is not None:
                nprobe, rerank, tuned = tune_with_rerank(
                    index,
                    probe,
                    None if ivf is None else ivf.nlist,
                    target_recall,
                    RefineVectors([refine_file]),
                )
            elif ivf is not None:
                nprobe = min(ivf.nlist, 16)
            if ivf is not None:
                ivf.nprobe = nprobe
        elif ivf is not None:
            nprobe, tuned = (
                tune_nprobe(index, probe, ivf.nlist, target_recall)
                if probe is not None
                else (min(ivf.nlist, 16), None)
            )
            ivf.nprobe = nprobe
        t_tune = time.perf_counter() - t0

        now = now_iso()
        info = IndexInfo(
            uri=out_uri,
            factory=plan.factory,
            metric=metric,
            dim=stats.dim,
            count=int(index.ntotal),
            model_version=stats.model_version,
            nprobe=nprobe,
            tuned_recall=None if tuned is None else round(tuned, 4),
            bytes_per_vector=float("nan"),
            generation=generation,
            index_file=index_name(generation),
            id_parts=[id_part_name(generation)],
            plan_reason=plan.reason,
            memory_budget=budget,
            build_seconds={
                "train": round(t_train, 3),
                "add": round(t_add, 3),
                "tune": round(t_tune, 3),
                "total": round(time.perf_counter() - t_start, 3),
            },
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
                    "at": now,
                }
            ],
            refine_parts=[] if refine_file is None else [refine_part_name(generation)],
            refine_dtype=None if refine_file is None else refine_dtype,
            rerank=rerank,
            added=added,
            skipped_existing=skipped,
        )
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
    add_batch_rows: int = 16_384,
    use_gpu: bool | str = "auto",
) -> IndexInfo:
    """Add a new table of embeddings to an existing index without retraining.

    IVF coarse centroids, PQ codebooks and OPQ rotations stay as trained; vectors are encoded
    and appended. image_ids already in the index are skipped (a repeated add changes nothing).

    Args:
        index_uri: folder of an index written by :func:`build_index`.
        embeddings_uri: Parquet file or folder with the new embeddings.
        storage: the storage layer.
        add_batch_rows: Parquet rows per batch.
        use_gpu: ``"auto"``, ``True`` or ``False``.

    Returns:
        The new :class:`IndexInfo` (``added``, ``skipped_existing`` say what happened); when
        nothing was new, the unchanged manifest and no new generation.

    Raises:
        ValueError: the new embeddings come from another model version or have another dim.
    """
    t_start = time.perf_counter()
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
    generation = previous.generation + 1
    with tempfile.TemporaryDirectory(prefix="vbatch-index-") as tmp:
        workdir = Path(tmp)
        index = load_faiss(previous, storage, workdir)
        seen = set(read_id_map(previous, storage).column("image_id").to_pylist())
        part = workdir / "ids-new.parquet"
        # a gallery with refinement vectors gets a part for the new ones (rows continue the
        # faiss ids); one built without stays without (re-ranking needs every vector)
        refine_file = workdir / "refine-new.npy" if previous.refine_parts else None
        adder = _adder(index, _want_gpu(use_gpu))
        with contextlib.ExitStack() as stack:
            writer = stack.enter_context(pq.ParquetWriter(part, ID_MAP_SCHEMA))
            refine_writer = (
                stack.enter_context(
                    NpyPartWriter(refine_file, previous.dim, previous.refine_dtype or "float32")
                )
                if refine_file is not None
                else None
            )
            added, skipped = _add_stream(
                adder,
                iter_embeddings(stats.files, storage, stats.dim, add_batch_rows),
                writer,
                seen,
                previous.model_version,
                refine=refine_writer,
            )
        index = _back_to_cpu(index, adder)
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
        now = now_iso()
        info = IndexInfo(**{**asdict(previous), "added": added, "skipped_existing": skipped})
        info.count = int(index.ntotal)
        info.generation = generation
        info.index_file = index_name(generation)
        info.id_parts = [*previous.id_parts, id_part_name(generation)]
        if refine_file is not None:
            info.refine_parts = [*previous.refine_parts, refine_part_name(generation)]
        info.history = [
            *previous.history,
            {
                "generation": generation,
                "operation": "add",
                "source": embeddings_uri,
                "added": added,
                "skipped_existing": skipped,
                "error_rows": stats.error_rows,
                "seconds": round(time.perf_counter() - t_start, 3),
                "at": now,
            },
        ]
        info.vbatch_version = vbatch_version()
        info.faiss_version = faiss.__version__
        commit(storage, index, part, info, previous, workdir, refine_file)
    return info
