"""Recall of the built index against exact search, and the ``nprobe`` that reaches a target.

Ground truth is accumulated batch by batch while adding (faiss
``contrib.exhaustive_search.knn_ground_truth`` style), so no second pass over the table is needed.
"""

from __future__ import annotations

import logging

import faiss
import numpy as np

from vbatch.operators.index.indexes import search_params

logger = logging.getLogger(__name__)

DEFAULT_TARGET_RECALL = 0.95
NPROBE_CANDIDATES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


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

    def ground_truth(self) -> np.ndarray:
        self.heap.finalize()
        return _drop_self(self.heap.I, self.self_ids, self.k)

    def recall(self, index: faiss.Index, nprobe: int, truth: np.ndarray) -> float:
        _, found = index.search(self.queries, self.k + 1, params=search_params(index, nprobe))
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
