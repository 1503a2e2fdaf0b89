"""faiss index objects: making one from a factory string, unwrapping it, per-call search
parameters (shared by build, tuning and search)."""

from __future__ import annotations

from typing import Any

import faiss

# RaBitQ quantizes the query too; 8 bits gives the recall of float queries at ~100x their speed
# (docs/BENCHMARKS.md). faiss' IVF default is 4 bits.
RABITQ_QUERY_BITS = 8
METRICS = {"inner_product": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}


def make_index(dim: int, factory: str, metric: str = "inner_product") -> faiss.Index:
    """``index_factory`` for inner product, without polysemous PQ training: index_factory turns
    it on for "PQ{M}", it only serves Hamming-filtered search (unused here) and it dominates PQ
    training time (minutes for PQ16 on 6k vectors on 2 cores, vs seconds for the k-means)."""
    index = faiss.index_factory(dim, factory, METRICS[metric])
    inner = faiss.downcast_index(index)
    while True:
        if hasattr(inner, "do_polysemous_training"):
            inner.do_polysemous_training = False
        if isinstance(inner, faiss.IndexPreTransform):
            inner = faiss.downcast_index(inner.index)
        elif isinstance(inner, faiss.IndexRefine):
            inner = faiss.downcast_index(inner.base_index)
        else:
            return index


def ivf_or_none(index: faiss.Index) -> Any:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def innermost(index: faiss.Index) -> Any:
    """The index under any ``IndexPreTransform`` (PCA, OPQ, random rotation)."""
    inner = faiss.downcast_index(index)
    while isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    return inner


def search_params(index: faiss.Index, nprobe: int | None) -> Any:
    """Per-call search parameters (never mutate a shared index: concurrent callers stay correct).

    IVF indexes get ``nprobe``; RaBitQ indexes also get the query quantization bits, which faiss
    does not store in the index file (``IndexPreTransform`` passes them through).
    """
    inner = innermost(index)
    params: Any
    if isinstance(inner, faiss.IndexIVFRaBitQ):
        params = faiss.IVFRaBitQSearchParameters()
        params.nprobe = nprobe or 1
        params.qb = RABITQ_QUERY_BITS
        return params
    if isinstance(inner, faiss.IndexRaBitQ):
        params = faiss.RaBitQSearchParameters()
        params.qb = RABITQ_QUERY_BITS
        return params
    if ivf_or_none(index) is not None:
        return faiss.SearchParametersIVF(nprobe=nprobe or 1)  # type: ignore[call-arg]  # SWIG stub
    return None
