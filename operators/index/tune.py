"""Recall of the built index against exact search, and the ``nprobe`` (and re-rank factor
``r``) that reach a target.

Ground truth is accumulated batch by batch while adding (faiss
``contrib.exhaustive_search.knn_ground_truth`` style), so no second pass over the table is needed.
With re-ranking, one search per ``nprobe`` for the largest candidate list serves every ``r``: the
top ``k x r`` of the compact index are a prefix of its top ``k x r_max``.
"""

from __future__ import annotations

import logging

import faiss
import numpy as np

from vbatch.operators.index.indexes import innermost, ivf_or_none, search_params
from vbatch.operators.index.refine import RefineVectors, rerank

logger = logging.getLogger(__name__)

DEFAULT_TARGET_RECALL = 0.95
NPROBE_CANDIDATES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
RERANK_CANDIDATES = (1, 2, 4, 8, 16)


class RecallProbe:
    """Exact top-(k+1) of held-out queries over everything added, accumulated batch by batch
    (faiss ``contrib.exhaustive_search.knn_ground_truth`` style), to tune ``nprobe``.

    The queries are sampled gallery vectors; each one's own gallery entry is dropped from both
    the exact and the approximate results (leave-one-out), so a query never "finds itself".
    """

    def __init__(self, queries: np.ndarray, ordinals: np.ndarray, k: int = 10) -> None:
        self.queries, self.k = queries, k
        self.heap = faiss.ResultHeap(len(queries), k + 1, keep_max=True)
        self._order = np.argsort(ordinals)
        self._sorted = ordinals[self._order]
        self.self_ids = np.full(len(queries), -1, dtype=np.int64)

    def observe(self, vectors: np.ndarray, faiss_ids: np.ndarray, ordinals: np.ndarray) -> None:
        kk = min(self.k + 1, len(vectors))
        dist, local = faiss.knn(self.queries, vectors, kk, metric=faiss.METRIC_INNER_PRODUCT)
        self.heap.add_result(dist, faiss_ids[local])
        pos = np.minimum(np.searchsorted(self._sorted, ordinals), len(self._sorted) - 1)
        hit = self._sorted[pos] == ordinals
        self.self_ids[self._order[pos[hit]]] = faiss_ids[hit]

    def partial(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(scores, ids, self_ids)`` of what this probe saw, for :meth:`merge` elsewhere (a
        distributed build's shard returns this; its queries are the same on every shard)."""
        self.heap.finalize()
        return self.heap.D.copy(), self.heap.I.copy(), self.self_ids.copy()

    def merge(self, scores: np.ndarray, ids: np.ndarray, self_ids: np.ndarray) -> None:
        """Fold another probe's :meth:`partial` (over other gallery vectors) into this one."""
        self.heap.add_result(np.ascontiguousarray(scores), np.ascontiguousarray(ids))
        self.self_ids = np.maximum(self.self_ids, self_ids)

    def ground_truth(self) -> np.ndarray:
        self.heap.finalize()
        return _drop_self(self.heap.I, self.self_ids, self.k)

    def recall(self, index: faiss.Index, nprobe: int, truth: np.ndarray) -> float:
        _, found = index.search(self.queries, self.k + 1, params=search_params(index, nprobe))
        return self.score(found, truth)

    def score(self, found: np.ndarray, truth: np.ndarray) -> float:
        """Recall of (Q, >= k+1) results (the query's own entry included) against ``truth``."""
        found = _drop_self(found, self.self_ids, self.k)
        hits = sum(len(set(a[a >= 0]) & set(b[b >= 0])) for a, b in zip(found, truth, strict=True))
        return hits / max(1, int((truth >= 0).sum()))


def _drop_self(ids: np.ndarray, self_ids: np.ndarray, k: int) -> np.ndarray:
    out = np.full((len(ids), k), -1, dtype=np.int64)
    for i, (row, me) in enumerate(zip(ids, self_ids, strict=True)):
        row = row[row != me][:k]
        out[i, : len(row)] = row
    return out


def tune_nprobe(
    index: faiss.Index, probe: RecallProbe, nlist: int, target: float
) -> tuple[int, float]:
    """Smallest nprobe whose recall reaches ``target`` (else the best seen, with a warning)."""
    truth = probe.ground_truth()
    best = (1, -1.0)
    for nprobe in sorted({min(p, nlist) for p in NPROBE_CANDIDATES}):
        rec = probe.recall(index, nprobe, truth)
        logger.info("nprobe=%d: recall@%d %.4f", nprobe, probe.k, rec)
        if rec > best[1] + 0.002:  # a real gain, not noise: keep the cheaper nprobe otherwise
            best = (nprobe, rec)
        if rec >= target:
            return nprobe, rec
    logger.warning(
        "recall@%d stays below %.2f (best %.4f at nprobe=%d): the code is too coarse for this "
        "data; raise the memory budget or choose a factory",
        probe.k,
        target,
        best[1],
        best[0],
    )
    return best


def _scan_bytes_per_probe(index: faiss.Index, nlist: int | None) -> float:
    """Code bytes one probed list holds on average (the whole index without IVF)."""
    ivf = ivf_or_none(index)
    code = ivf.code_size if ivf is not None else getattr(innermost(index), "code_size", index.d * 4)
    return float(index.ntotal) * code / (nlist or 1)


def tune_with_rerank(
    index: faiss.Index,
    probe: RecallProbe,
    nlist: int | None,
    target: float,
    vectors: RefineVectors,
) -> tuple[int | None, int, float]:
    """The cheapest ``(nprobe, r)`` whose recall with exact re-ranking of the top ``k x r``
    reaches ``target`` (else the best recall seen, with a warning).

    Cost is the bytes a query touches: ``nprobe`` lists of codes plus ``k x r`` refinement
    vectors (both come from the page cache of mapped files at search time).

    Args:
        index: the compact index.
        probe: held-out gallery queries and their exact neighbours.
        nlist: inverted lists (``None``: no IVF, only ``r`` is tuned).
        target: recall@k to reach.
        vectors: the refinement vectors of every indexed vector.

    Returns:
        ``(nprobe or None, r, recall)``.
    """
    truth = probe.ground_truth()
    k = probe.k
    nprobes: list[int | None] = [None]
    if nlist is not None:
        nprobes = [*sorted({min(p, nlist) for p in NPROBE_CANDIDATES})]
    per_probe = _scan_bytes_per_probe(index, nlist)
    row_bytes = vectors.dim * vectors.parts[0].dtype.itemsize if vectors.parts else 0

    def cost(nprobe: int | None, r: int) -> float:
        return (nprobe or 1) * per_probe + (k + 1) * r * row_bytes

    best: tuple[float, int | None, int, float] | None = None  # (cost, nprobe, r, recall)
    fallback: tuple[int | None, int, float] = (None, 1, -1.0)
    for nprobe in nprobes:
        if best is not None and cost(nprobe, RERANK_CANDIDATES[0]) >= best[0]:
            break  # more probes cannot be cheaper than what already reaches the target
        kk = (k + 1) * max(RERANK_CANDIDATES)
        _, cand = index.search(probe.queries, kk, params=search_params(index, nprobe))
        for r in RERANK_CANDIDATES:
            _, found = rerank(probe.queries, cand[:, : (k + 1) * r], vectors, k + 1)
            rec = probe.score(found, truth)
            logger.info("nprobe=%s rerank=%d: recall@%d %.4f", nprobe, r, k, rec)
            if rec > fallback[2] + 0.002:
                fallback = (nprobe, r, rec)
            if rec >= target:
                if best is None or cost(nprobe, r) < best[0]:
                    best = (cost(nprobe, r), nprobe, r, rec)
                break  # a larger r at this nprobe only costs more
    if best is not None:
        return best[1], best[2], best[3]
    logger.warning(
        "recall@%d with re-ranking stays below %.2f (best %.4f at nprobe=%s, rerank=%d)",
        k,
        target,
        fallback[2],
        fallback[0],
        fallback[1],
    )
    return fallback


def tune_index(
    index: faiss.Index,
    probe: RecallProbe | None,
    refine: RefineVectors | None,
    target: float,
) -> tuple[int | None, int | None, float | None]:
    """The default search parameters of a freshly built index, set on it where faiss keeps them.

    Args:
        index: the built index.
        probe: held-out gallery queries with their exact neighbours (``None``: no tuning data;
            an IVF then gets ``nprobe = min(nlist, 16)``).
        refine: the refinement vectors (``None``: no re-ranking).
        target: recall@k to reach.

    Returns:
        ``(nprobe, rerank, tuned recall)``, each ``None`` where it does not apply.
    """
    ivf = ivf_or_none(index)
    nprobe = tuned = rerank = None
    if refine is not None:
        rerank = 1
        if probe is not None:
            nprobe, rerank, tuned = tune_with_rerank(
                index, probe, None if ivf is None else ivf.nlist, target, refine
            )
        elif ivf is not None:
            nprobe = min(ivf.nlist, 16)
    elif ivf is not None:
        if probe is not None:
            nprobe, tuned = tune_nprobe(index, probe, ivf.nlist, target)
        else:
            nprobe = min(ivf.nlist, 16)
    if ivf is not None:
        ivf.nprobe = nprobe
    return nprobe, rerank, tuned
