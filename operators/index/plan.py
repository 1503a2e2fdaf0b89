"""Which faiss index a gallery gets: the factory string for its size and memory budget.

Follows the faiss wiki "Guidelines to choose an index": exact ``Flat`` for small galleries, an
inverted file ``IVF{nlist}`` with ``4·sqrt(N) <= nlist <= 16·sqrt(N)`` trained on at least
``39·nlist`` sampled vectors above that, and a compressed code when the flat vectors do not fit
the memory budget: scalar quantization (SQ8), extended RaBitQ with 2 to 7 bits per dimension (Gao
& Long, SIGMOD 2024; Gao et al., SIGMOD 2025) or product quantization below 2 bits (Jégou, Douze,
Schmid, TPAMI 2011; OPQ: Ge et al., CVPR 2013). The measured recall and size of each tier are in
``docs/BENCHMARKS.md`` ("Re-ID index").
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import faiss

# Below this many vectors brute force is both exact and fast enough (~1536-d: 10 ms per query
# at 20k vectors on one core), and an IVF would have too few points per list to train well.
EXACT_MAX_VECTORS = 20_000
# faiss warns below 39 training points per centroid; k-means quality drops below ~30 (wiki).
MIN_TRAIN_PER_LIST = 39
# IVF lists store one int64 id per vector next to its code.
IVF_ID_BYTES = 8
# RaBitQ codes: 2..7 bits per dimension (1 bit needs re-ranking to be useful; 8 bits is SQ8's size)
RABITQ_BITS = (7, 6, 5, 4, 3, 2)


def parse_bytes(value: int | float | str | None) -> int | None:
    """``"512MB"``, ``"1.5GiB"``, ``"2g"`` or a number of bytes → bytes (``None`` stays ``None``)."""
    if value is None or isinstance(value, (int, float)):
        return None if value is None else int(value)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)(i?b?)\s*", value.lower())
    if not m:
        raise ValueError(f"cannot parse memory size {value!r} (e.g. 512MB, 2GiB, 1e9)")
    number, unit, binary = float(m.group(1)), m.group(2), m.group(3).startswith("i")
    base = 1024 if binary else 1000
    return int(number * base ** "_kmgt".index(unit or "_"))


def is_lossy(factory: str) -> bool:
    """Whether the factory's codes approximate the vectors (anything but ``Flat`` storage):
    such an index benefits from re-ranking with the full vectors."""
    parts = factory.replace(" ", "").split(",")
    return parts[-1] != "Flat" or any(p.startswith(("PCA", "OPQ")) for p in parts[:-1])


# -- choosing the index ---------------------------------------------------------------------------
@dataclass(frozen=True)
class IndexPlan:
    """What :func:`choose_factory` decided and why.

    Attributes:
        factory: ``faiss.index_factory`` string.
        nlist: inverted lists (``None`` for indexes without IVF).
        bytes_per_vector: estimated memory per stored vector (code + IVF id).
        reason: one line for logs and the manifest.
    """

    factory: str
    nlist: int | None
    bytes_per_vector: float
    reason: str


def _pow2_at_least(x: float) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1.0, x))))


def choose_nlist(n: int, n_train: int) -> int:
    """Inverted lists for ``n`` vectors: the power of two >= ``4·sqrt(n)`` (so <= ``8·sqrt(n)``,
    inside the wiki's ``4..16·sqrt(N)``), lowered until ``n_train`` gives each list 39 points."""
    nlist = _pow2_at_least(4 * math.sqrt(n))
    while nlist > 16 and nlist * MIN_TRAIN_PER_LIST > n_train:
        nlist //= 2
    return min(nlist, 65536)


def _pq_m(dim: int, code_bytes: float) -> int | None:
    """Largest number of 8-bit sub-quantizers that divides ``dim``, fits ``code_bytes`` and keeps
    at least 2 dimensions per sub-quantizer (1-d sub-quantizers are scalar quantization)."""
    best = None
    for m in range(1, dim // 2 + 1):
        if dim % m == 0 and m <= code_bytes:
            best = m
    return best


def rabitq_code_bytes(dim: int, bits: int) -> int:
    """Bytes of one ``RaBitQ{bits}`` code of ``dim`` dimensions (``dim·bits/8`` plus per-vector
    correction factors), as faiss lays it out."""
    index: Any = faiss.IndexRaBitQ(dim, faiss.METRIC_INNER_PRODUCT, bits)
    return int(index.code_size)  # an Index attribute the SWIG stubs do not declare


def _rabitq_bits(dim: int, code_budget: float) -> int | None:
    return next((b for b in RABITQ_BITS if rabitq_code_bytes(dim, b) <= code_budget), None)


def choose_factory(
    n: int,
    dim: int,
    memory_budget: int | str | None = None,
    n_train: int | None = None,
) -> IndexPlan:
    """The index for ``n`` vectors of ``dim`` dimensions within ``memory_budget`` bytes.

    Follows the faiss wiki "Guidelines to choose an index":

    * ``n <= EXACT_MAX_VECTORS`` and the float32 vectors fit: ``Flat`` (exact).
    * otherwise ``IVF{nlist}`` (see :func:`choose_nlist`) with the largest code the budget
      allows: ``Flat`` (no compression), ``SQ8`` (4x), ``RaBitQ{b}`` with 7 down to 2 bits per
      dimension (4.5x..15x), ``PQ{M}`` with at most 4 dims per 8-bit sub-quantizer, then
      ``OPQ{M},…,PQ{M}`` (the wiki's choice when memory is very important).
    * RaBitQ replaces the wiki's ``SQ4`` and most of its PQ range: at the same memory its
      estimates of inner products are far more accurate (docs/BENCHMARKS.md), it needs no
      codebook training (only the coarse k-means), and it encodes fast.
    * no PCA tier (the wiki's "PCARx,…,SQ8"): faiss' PCA centres the data, which changes inner
      products by a per-vector term (<y, mean>): with METRIC_INNER_PRODUCT, exact search after a
      full-rank PCA found only 95 % of the true top-10 of re-ID-like embeddings. An explicit
      ``PCAR…`` factory must be built with ``metric="l2"`` (same order for unit vectors).
    * a small gallery that does not fit flat gets ``SQ8``/``RaBitQ{b}``/``PQ{M}`` without IVF.

    Args:
        n: vectors the index will hold.
        dim: their dimension.
        memory_budget: bytes for the index in RAM (int or ``"4GB"``); ``None`` means no limit.
        n_train: training vectors available (defaults to ``n``); limits ``nlist``.

    Returns:
        The :class:`IndexPlan`.

    Raises:
        ValueError: when even the smallest code (``PQ`` with ``dim/64`` bytes) does not fit.
    """
    budget = parse_bytes(memory_budget)
    per_vector = math.inf if budget is None else budget / max(n, 1)
    flat_bytes = 4 * dim
    n_train = n if n_train is None else min(n, n_train)

    if n <= EXACT_MAX_VECTORS:
        if per_vector >= flat_bytes:
            return IndexPlan("Flat", None, flat_bytes, f"{n} vectors <= {EXACT_MAX_VECTORS}: exact")
        if per_vector >= dim:
            return IndexPlan("SQ8", None, dim, "small gallery, flat exceeds budget: SQ8")
        bits = _rabitq_bits(dim, per_vector)
        if bits is not None:
            return IndexPlan(
                f"RaBitQ{bits}",
                None,
                rabitq_code_bytes(dim, bits),
                f"small gallery, SQ8 exceeds budget: RaBitQ{bits}",
            )
        m = _pq_m(dim, per_vector)
        if m is None or n < 256:  # 8-bit PQ needs >= 256 training points
            raise ValueError(
                f"memory budget {budget} B is too small for {n} vectors of dim {dim} "
                f"({per_vector:.1f} B/vector); raise the budget or pass an explicit factory"
            )
        return IndexPlan(f"PQ{m}", None, m, f"small gallery, {per_vector:.0f} B/vector: PQ{m}")

    nlist = choose_nlist(n, n_train)
    code_budget = per_vector - IVF_ID_BYTES
    # every IVF also holds nlist centroids; tiny next to the codes for n >> nlist, counted anyway
    code_budget -= nlist * flat_bytes / n
    if code_budget >= flat_bytes:
        return IndexPlan(
            f"IVF{nlist},Flat", nlist, flat_bytes + IVF_ID_BYTES, "flat vectors fit the budget"
        )
    if code_budget >= dim:
        return IndexPlan(
            f"IVF{nlist},SQ8", nlist, dim + IVF_ID_BYTES, "flat exceeds budget, SQ8 fits (4x)"
        )
    bits = _rabitq_bits(dim, code_budget)
    if bits is not None:
        size = rabitq_code_bytes(dim, bits)
        return IndexPlan(
            f"IVF{nlist},RaBitQ{bits}",
            nlist,
            size + IVF_ID_BYTES,
            f"SQ8 exceeds budget: RaBitQ with {bits} bits per dimension ({size} B/code)",
        )
    # below 2 bits per dimension: product quantization, rotated by OPQ once sub-quantizers span
    # more than 4 dims so that they share the variance (faiss wiki: "OPQM_D,...,PQM")
    m = _pq_m(dim, code_budget - 256 * flat_bytes / n)  # codebooks: 256 x dim floats in all
    if m is None or dim // m > 64:
        raise ValueError(
            f"memory budget {budget} B is too small for {n} vectors of dim {dim} "
            f"({per_vector:.1f} B/vector); raise the budget or pass an explicit factory"
        )
    if m >= dim // 4:  # <= 4 dims per sub-quantizer: a rotation gains little
        return IndexPlan(
            f"IVF{nlist},PQ{m}", nlist, m + IVF_ID_BYTES, f"{code_budget:.0f} B/vector: PQ{m}"
        )
    return IndexPlan(
        f"OPQ{m},IVF{nlist},PQ{m}",
        nlist,
        m + IVF_ID_BYTES,
        f"{code_budget:.0f} B/vector: OPQ-rotated PQ{m} ({dim // m} dims per sub-quantizer)",
    )
