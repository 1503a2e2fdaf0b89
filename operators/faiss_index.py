"""Gallery index for re-ID embeddings: build, extend, persist and search a FAISS index.

The index answers "which gallery images look most like this person" with inner products of
L2-normalised embeddings (= cosine similarity, ``METRIC_INNER_PRODUCT``). The index type follows
the FAISS "Guidelines to choose an index" (faiss wiki): exact ``Flat`` for small galleries, an
inverted file ``IVF{nlist}`` with ``4·sqrt(N) <= nlist <= 16·sqrt(N)`` trained on at least
``39·nlist`` sampled vectors above that, and a compressed code when the flat vectors do not fit
the memory budget: scalar quantization (SQ8), extended RaBitQ with 2 to 7 bits per dimension (Gao
& Long, "RaBitQ: quantizing high-dimensional vectors with a theoretical error bound for
approximate nearest neighbor search", SIGMOD 2024; Gao et al., "Practical and asymptotically
optimal quantization of high-dimensional vectors in Euclidean space for approximate nearest
neighbor search", SIGMOD 2025) or product quantization below 2 bits (Jégou, Douze, Schmid,
"Product quantization for nearest neighbor search", TPAMI 2011; OPQ: Ge et al., CVPR 2013). Reference implementation: faiss (Johnson, Douze, Jégou,
"Billion-scale similarity search with GPUs", 2017; Douze et al., "The Faiss library", 2024),
``faiss/contrib/ondisk.py`` and ``faiss/contrib/big_batch_search.py`` for the persistence habits.

Embeddings come from ``reid embed``: Parquet files (one file or a folder, local or ``s3://``) with
``image_id``, ``status``, ``embedding`` (``fixed_size_list<float32, D>``, L2-normalised, null on
error rows) and ``model_version``. Only ``status == "ok"`` rows are indexed. The tables are
streamed with ``ParquetFile.iter_batches``; at no point is a whole table in memory.

Layout under the index URI (every object written through :class:`vbatch.operators.storage.Storage`)::

    index.json                 manifest and commit point (factory, dim, count, nprobe, history…)
    index-00003.faiss          the FAISS index of generation 3
    ids/part-00000.parquet     faiss_id int64, image_id string, model_version string
    ids/part-00003.parquet     rows added by generation 3 (an ``add_to_index``)

Object stores have no multi-object transaction, so every build or add writes a new *generation*
(new index file, new id part) and only then replaces ``index.json``; a reader that opened the old
manifest still finds the files it names, because the previous generation's files are kept until
the next commit. A crashed run leaves unreferenced files that the next commit overwrites or
removes; a repeated run therefore never duplicates anything.
"""

from __future__ import annotations

import json
import logging
import math
import re
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vbatch.operators.storage import Storage, join

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "index.json"
IDS_DIR = "ids"
_INDEX_FILE_RE = re.compile(r"index-(\d{5})\.faiss$")
_ID_PART_RE = re.compile(r"part-(\d{5})\.parquet$")

ID_MAP_SCHEMA = pa.schema(
    [
        pa.field("faiss_id", pa.int64(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("model_version", pa.string()),
    ]
)

# Below this many vectors brute force is both exact and fast enough (~1536-d: 10 ms per query
# at 20k vectors on one core), and an IVF would have too few points per list to train well.
EXACT_MAX_VECTORS = 20_000
# faiss warns below 39 training points per centroid; k-means quality drops below ~30 (wiki).
MIN_TRAIN_PER_LIST = 39
# IVF lists store one int64 id per vector next to its code.
IVF_ID_BYTES = 8
DEFAULT_TARGET_RECALL = 0.95
PQ_TRAIN_POINTS_PER_CENTROID = 40
# RaBitQ codes: 2..7 bits per dimension (1 bit needs re-ranking to be useful; 8 bits is SQ8's size)
RABITQ_BITS = (7, 6, 5, 4, 3, 2)
# RaBitQ quantizes the query too; 8 bits gives the recall of float queries (measured on 200k x
# 1536: 0.9539 both at nprobe 128) at ~100x their speed. faiss' IVF default is 4 bits.
RABITQ_QUERY_BITS = 8
_METRICS = {"inner_product": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
NPROBE_CANDIDATES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _vbatch_version() -> str:
    try:
        from importlib.metadata import version

        return version("vbatch")
    except Exception:  # not installed (running from a checkout)
        return "unknown"


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
      estimates of inner products are far more accurate (see the figures below), it needs no
      codebook training (only the coarse k-means), and it encodes fast.
    * no PCA tier (the wiki's "PCARx,…,SQ8"): faiss' PCA centres the data, which changes inner
      products by a per-vector term (<y, mean>): with METRIC_INNER_PRODUCT, exact search after a
      full-rank PCA found only 95 % of the true top-10 of re-ID-like embeddings. An explicit
      ``PCAR…`` factory must be built with ``metric="l2"`` (same order for unit vectors).
    * measured on 200k such vectors (bench/bench_index.py, recall@10 vs exact): ``IVF2048,
      RaBitQ3`` 9.2x smaller than flat, 0.954; ``IVF2048,SQ4`` 7.3x, 0.955; ``IVF2048,PQ512``
      10.4x, 0.938.
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


# -- reading embeddings tables --------------------------------------------------------------------
_READ_COLUMNS = ("image_id", "status", "embedding", "model_version")


@dataclass(frozen=True)
class TableStats:
    """What a first, cheap pass over an embeddings table found.

    Attributes:
        files: Parquet file URIs, in reading order.
        count: ``status == "ok"`` rows.
        error_rows: other rows (never indexed).
        dim: embedding dimension.
        model_version: the one model version of the ok rows (``None`` if there are none).
    """

    files: tuple[str, ...]
    count: int
    error_rows: int
    dim: int
    model_version: str | None


def _embedding_dim(type_: pa.DataType, file_uri: str) -> int | None:
    if pa.types.is_fixed_size_list(type_):
        return type_.list_size
    if pa.types.is_list(type_) or pa.types.is_large_list(type_):
        return None  # variable lists: the dimension is read from the values
    raise ValueError(f"{file_uri}: column 'embedding' has type {type_}, expected a list of float32")


def _open_parquet(storage: Storage, file_uri: str) -> pq.ParquetFile:
    fs, path = storage.arrow_fs(file_uri)
    return pq.ParquetFile(fs.open_input_file(path))


def _list_parquet(storage: Storage, uri: str) -> list[str]:
    files = storage.list_files(uri, suffix=".parquet")
    if not files:
        raise FileNotFoundError(f"no Parquet files under {uri}")
    return files


def scan_embeddings(uri: str, storage: Storage) -> TableStats:
    """Count the ok rows, check one dimension and one model version (reads no embeddings).

    Raises:
        ValueError: a missing column, mixed dimensions or mixed model versions, naming the file.
        FileNotFoundError: no Parquet file under ``uri``.
    """
    files = _list_parquet(storage, uri)
    count = errors = 0
    dim: int | None = None
    versions: dict[str, str] = {}  # version -> first file seen in
    for file_uri in files:
        pf = _open_parquet(storage, file_uri)
        schema = pf.schema_arrow
        missing = [c for c in _READ_COLUMNS if c not in schema.names]
        if missing:
            raise ValueError(f"{file_uri}: embeddings table lacks column(s) {missing}")
        file_dim = _embedding_dim(schema.field("embedding").type, file_uri)
        for batch in pf.iter_batches(batch_size=65536, columns=["status", "model_version"]):
            ok = pc.equal(batch.column("status"), "ok")
            ok = pc.fill_null(ok, False)
            n_ok = pc.sum(ok).as_py() or 0
            count += n_ok
            errors += batch.num_rows - n_ok
            if n_ok:
                for v in pc.unique(batch.column("model_version").filter(ok)).to_pylist():
                    versions.setdefault(str(v), file_uri)
        if file_dim is None and pf.metadata.num_rows:
            first = next(pf.iter_batches(batch_size=1024, columns=["embedding"]))
            lengths = pc.list_value_length(first.column("embedding")).drop_null()
            file_dim = int(lengths[0].as_py()) if len(lengths) else None
        if file_dim is not None:
            if dim is not None and file_dim != dim:
                raise ValueError(f"{file_uri}: embedding dim {file_dim}, other files have {dim}")
            dim = file_dim
    if len(versions) > 1:
        raise ValueError(
            f"embeddings under {uri} mix model versions {sorted(versions)} "
            f"(first seen in {sorted(set(versions.values()))}); one index holds one model version"
        )
    if dim is None:
        raise ValueError(f"cannot tell the embedding dimension of {uri} (no rows)")
    version = next(iter(versions), None)
    return TableStats(tuple(files), count, errors, dim, version)


@dataclass
class EmbeddingBatch:
    """``status == "ok"`` rows of one record batch.

    Attributes:
        image_ids: (B,) string array.
        vectors: (B, D) float32, L2-normalised.
        ordinals: (B,) int64 position among all ok rows of the table (stable across passes).
    """

    image_ids: pa.Array
    vectors: np.ndarray
    ordinals: np.ndarray


def iter_embeddings(
    files: Sequence[str], storage: Storage, dim: int, batch_rows: int = 16384
) -> Iterator[EmbeddingBatch]:
    """Stream the ok rows of ``files`` in batches of at most ``batch_rows`` input rows."""
    ordinal = 0
    for file_uri in files:
        pf = _open_parquet(storage, file_uri)
        for batch in pf.iter_batches(
            batch_size=batch_rows, columns=["image_id", "status", "embedding"]
        ):
            ok = pc.fill_null(pc.equal(batch.column("status"), "ok"), False)
            batch = batch.filter(ok)
            if batch.num_rows == 0:
                continue
            emb = batch.column("embedding")
            if emb.null_count:
                bad = batch.column("image_id").filter(emb.is_null())[0]
                raise ValueError(f"{file_uri}: row image_id={bad} has status 'ok' but no embedding")
            values = emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
            if values.size != batch.num_rows * dim:
                raise ValueError(f"{file_uri}: embeddings are not all of dimension {dim}")
            # a private, writable copy: Arrow buffers are read-only and normalize_L2 works in place
            vectors = np.array(values.reshape(batch.num_rows, dim), dtype=np.float32, order="C")
            if not np.isfinite(vectors).all():
                row = int(np.flatnonzero(~np.isfinite(vectors).all(axis=1))[0])
                raise ValueError(
                    f"{file_uri}: image_id={batch.column('image_id')[row]} has a non-finite embedding"
                )
            # the table promises unit norm; renormalising is cheap and makes IP == cosine for sure
            faiss.normalize_L2(vectors)
            n = batch.num_rows
            yield EmbeddingBatch(
                batch.column("image_id").cast(pa.string()),
                vectors,
                np.arange(ordinal, ordinal + n, dtype=np.int64),
            )
            ordinal += n


def sample_embeddings(
    files: Sequence[str],
    storage: Storage,
    dim: int,
    count: int,
    size: int,
    seed: int = 0,
    batch_rows: int = 16384,
) -> tuple[np.ndarray, np.ndarray]:
    """A uniform sample of ``size`` ok rows, read in one streaming pass.

    Returns:
        ``(vectors (S, D) float32, ordinals (S,) int64)`` in random order.
    """
    size = min(size, count)
    rng = np.random.default_rng(seed)
    wanted = np.sort(rng.choice(count, size=size, replace=False))
    out = np.empty((size, dim), dtype=np.float32)
    filled = 0
    for batch in iter_embeddings(files, storage, dim, batch_rows):
        lo, hi = np.searchsorted(wanted, [batch.ordinals[0], batch.ordinals[-1] + 1])
        if hi > lo:
            out[filled : filled + hi - lo] = batch.vectors[wanted[lo:hi] - batch.ordinals[0]]
            filled += hi - lo
        if filled == size:
            break
    perm = rng.permutation(size)
    return out[perm], wanted[perm]


# -- manifest -------------------------------------------------------------------------------------
@dataclass
class IndexInfo:
    """The manifest ``index.json`` of one gallery index (plus what the last operation did).

    Attributes:
        uri: where the index lives (not stored; the manifest can be moved with its files).
        factory: ``faiss.index_factory`` string.
        dim: vector dimension.
        count: vectors in the index (== rows of the id map).
        model_version: the re-ID model version of every vector.
        nprobe: default inverted lists visited per query (``None`` for non-IVF indexes).
        tuned_recall: 10-recall@10 vs exact search measured at build time with ``nprobe``.
        bytes_per_vector: serialized index size / count (codes, ids, quantizers included).
        generation: increases with every build or add; names the index file and id part.
        index_file: index file name, relative to ``uri``.
        id_parts: id map Parquet files, relative to ``uri``, in ``faiss_id`` order.
        plan_reason: why this factory (auto choice or ``"explicit factory"``).
        memory_budget: bytes the build was asked to fit (``None``: no limit).
        build_seconds: ``train``, ``add``, ``tune`` and ``total`` seconds of the build.
        created_at, updated_at: UTC ISO timestamps.
        vbatch_version, faiss_version: software that wrote it.
        history: one dict per build/add: generation, operation, source URI, added, skipped…
        added: vectors the operation that returned this info added (not stored).
        skipped_existing: image_ids that operation skipped because they were indexed already.
    """

    uri: str
    factory: str
    dim: int
    count: int
    model_version: str | None
    nprobe: int | None
    tuned_recall: float | None
    bytes_per_vector: float
    generation: int
    index_file: str
    id_parts: list[str]
    plan_reason: str = ""
    memory_budget: int | None = None
    build_seconds: dict[str, float] = field(default_factory=dict)
    created_at: str = ""
    updated_at: str = ""
    vbatch_version: str = ""
    faiss_version: str = ""
    metric: str = "inner_product"
    format_version: int = FORMAT_VERSION
    history: list[dict[str, Any]] = field(default_factory=list)
    added: int = 0
    skipped_existing: int = 0

    _NOT_STORED = ("uri", "added", "skipped_existing")

    def to_json(self) -> str:
        data = {k: v for k, v in asdict(self).items() if k not in self._NOT_STORED}
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, uri: str) -> IndexInfo:
        data = json.loads(text)
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{uri}: unsupported index format {data.get('format_version')!r}")
        known = {f for f in cls.__dataclass_fields__ if f not in cls._NOT_STORED}
        return cls(uri=uri, **{k: v for k, v in data.items() if k in known})


def read_info(uri: str, storage: Storage) -> IndexInfo:
    """The manifest of the index at ``uri``; ``FileNotFoundError`` if there is none."""
    return IndexInfo.from_json(storage.read_bytes(join(uri, MANIFEST_NAME)), uri)


def _try_read_info(uri: str, storage: Storage) -> IndexInfo | None:
    try:
        return read_info(uri, storage)
    except FileNotFoundError:
        return None


def _index_name(generation: int) -> str:
    return f"index-{generation:05d}.faiss"


def _id_part_name(generation: int) -> str:
    return f"{IDS_DIR}/part-{generation:05d}.parquet"


def _commit(
    storage: Storage,
    index: faiss.Index,
    id_part: Path | None,
    info: IndexInfo,
    previous: IndexInfo | None,
    workdir: Path,
) -> None:
    """Upload the generation's index and id part, then the manifest (the commit point), then
    remove files that neither the new nor the previous manifest names."""
    local_index = workdir / "index.faiss"
    faiss.write_index(index, str(local_index))
    info.bytes_per_vector = round(local_index.stat().st_size / max(info.count, 1), 2)
    storage.put_file(local_index, join(info.uri, info.index_file))
    if id_part is not None:
        storage.put_file(id_part, join(info.uri, _id_part_name(info.generation)))
    info.updated_at = _now()
    storage.write_bytes(join(info.uri, MANIFEST_NAME), info.to_json().encode())

    keep = {join(info.uri, name) for name in [info.index_file, *info.id_parts]}
    if previous is not None:  # readers holding the previous manifest can still open its files
        keep |= {join(info.uri, name) for name in [previous.index_file, *previous.id_parts]}
    for file_uri in storage.list_files(info.uri):
        ours = (
            _INDEX_FILE_RE.search(file_uri) and join(info.uri, Path(file_uri).name) == file_uri
        ) or (
            _ID_PART_RE.search(file_uri)
            and join(info.uri, IDS_DIR, Path(file_uri).name) == file_uri
        )
        if ours and file_uri not in keep:
            logger.info("removing stale index file %s", file_uri)
            storage.delete(file_uri)


_ID_MAP_READ = pa.schema([ID_MAP_SCHEMA.field("faiss_id"), ID_MAP_SCHEMA.field("image_id")])


def _read_id_map(info: IndexInfo, storage: Storage) -> pa.Table:
    """``faiss_id, image_id`` of every id part, checked to be the faiss ids ``0..count-1``.

    Read with ``ParquetFile`` rather than the dataset API: for a 200k gallery the dataset reader
    left ~75 MB resident (mostly decoding buffers the allocator keeps) against ~30 for this.
    """
    tables = [
        _open_parquet(storage, join(info.uri, name))
        .read(columns=_ID_MAP_READ.names)
        .cast(_ID_MAP_READ)
        for name in info.id_parts
    ]
    ids = pa.concat_tables(tables).combine_chunks() if tables else _ID_MAP_READ.empty_table()
    expected = np.arange(info.count, dtype=np.int64)
    got = ids.column("faiss_id").to_numpy()
    if len(got) != info.count or not np.array_equal(got, expected):
        raise ValueError(
            f"{info.uri}: id map has {len(got)} rows that are not faiss ids 0..{info.count - 1}; "
            "the index is damaged, rebuild it"
        )
    return ids


def _load_faiss(info: IndexInfo, storage: Storage, workdir: Path) -> faiss.Index:
    local = storage.get_file(join(info.uri, info.index_file), workdir / "index.faiss")
    index = faiss.read_index(str(local))
    if index.ntotal != info.count or index.d != info.dim:
        raise ValueError(
            f"{info.uri}: {info.index_file} holds {index.ntotal} vectors of dim {index.d}, "
            f"the manifest says {info.count} of dim {info.dim}"
        )
    return index


# -- GPU ------------------------------------------------------------------------------------------
def _want_gpu(use_gpu: bool | str) -> bool:
    """``"auto"``: use a GPU when faiss was built with CUDA and sees one."""
    n = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if use_gpu == "auto":
        return n > 0
    if use_gpu and n == 0:
        raise RuntimeError("use_gpu=True but faiss sees no GPU (faiss-cpu build or no device)")
    return bool(use_gpu)


def _train(index: faiss.Index, sample: np.ndarray, gpu: bool) -> None:
    ivf = _ivf_or_none(index)
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
    if not gpu or _ivf_or_none(index) is None:
        return index
    if isinstance(_innermost(index), faiss.IndexIVFRaBitQ):
        logger.info("adding on CPU: faiss has no GPU RaBitQ index (training used the GPU)")
        return index
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except (RuntimeError, AttributeError) as err:  # e.g. PQ sub-quantizer counts the GPU lacks
        logger.warning("adding on CPU: faiss cannot move %s to the GPU (%s)", type(index), err)
        return index


def _back_to_cpu(index: faiss.Index, adder: faiss.Index) -> faiss.Index:
    return index if adder is index else faiss.index_gpu_to_cpu(adder)


def _make_index(dim: int, factory: str, metric: str = "inner_product") -> faiss.Index:
    """``index_factory`` for inner product, without polysemous PQ training: index_factory turns
    it on for "PQ{M}", it only serves Hamming-filtered search (unused here) and it dominates PQ
    training time (minutes for PQ16 on 6k vectors on 2 cores, vs seconds for the k-means)."""
    index = faiss.index_factory(dim, factory, _METRICS[metric])
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


def _ivf_or_none(index: faiss.Index) -> Any:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _innermost(index: faiss.Index) -> Any:
    """The index under any ``IndexPreTransform`` (PCA, OPQ, random rotation)."""
    inner = faiss.downcast_index(index)
    while isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    return inner


def _search_params(index: faiss.Index, nprobe: int | None) -> Any:
    """Per-call search parameters (never mutate a shared index: concurrent callers stay correct).

    IVF indexes get ``nprobe``; RaBitQ indexes also get the query quantization bits, which faiss
    does not store in the index file (``IndexPreTransform`` passes them through).
    """
    inner = _innermost(index)
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
    if _ivf_or_none(index) is not None:
        return faiss.SearchParametersIVF(nprobe=nprobe or 1)  # type: ignore[call-arg]  # SWIG stub
    return None


# -- adding ---------------------------------------------------------------------------------------
class _RecallProbe:
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
        _, found = index.search(self.queries, self.k + 1, params=_search_params(index, nprobe))
        found = _drop_self(found, self.self_ids, self.k)
        hits = sum(len(set(a[a >= 0]) & set(b[b >= 0])) for a, b in zip(found, truth, strict=True))
        return hits / max(1, int((truth >= 0).sum()))


def _drop_self(ids: np.ndarray, self_ids: np.ndarray, k: int) -> np.ndarray:
    out = np.full((len(ids), k), -1, dtype=np.int64)
    for i, (row, me) in enumerate(zip(ids, self_ids, strict=True)):
        row = row[row != me][:k]
        out[i, : len(row)] = row
    return out


def _tune_nprobe(
    index: faiss.Index, probe: _RecallProbe, nlist: int, target: float
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


def _add_stream(
    index: faiss.Index,
    batches: Iterator[EmbeddingBatch],
    writer: pq.ParquetWriter,
    seen: set[str],
    model_version: str | None,
    probe: _RecallProbe | None = None,
) -> tuple[int, int]:
    """Add every batch whose image_id is new; write its id map rows. Returns (added, skipped)."""
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
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {sorted(_METRICS)}, got {metric!r}")
    index = _make_index(stats.dim, plan.factory, metric)
    gpu = _want_gpu(use_gpu)

    t0 = time.perf_counter()
    probe = None
    if not index.is_trained:
        sample, ordinals = sampler.get()
        _train(index, sample, gpu)
        n_q = min(tune_queries, len(sample))
        if _ivf_or_none(index) is not None and n_q:
            probe = _RecallProbe(sample[:n_q].copy(), ordinals[:n_q])
        del sample
        sampler.release()
    t_train = time.perf_counter() - t0

    previous = _try_read_info(out_uri, storage)
    generation = 0 if previous is None else previous.generation + 1
    with tempfile.TemporaryDirectory(prefix="vbatch-index-") as tmp:
        workdir = Path(tmp)
        t0 = time.perf_counter()
        adder = _adder(index, gpu)
        with pq.ParquetWriter(workdir / "ids.parquet", ID_MAP_SCHEMA) as writer:
            added, skipped = _add_stream(
                adder,
                iter_embeddings(stats.files, storage, stats.dim, add_batch_rows),
                writer,
                set(),
                stats.model_version,
                probe,
            )
        index = _back_to_cpu(index, adder)
        t_add = time.perf_counter() - t0
        if skipped:
            logger.warning("%s: %d duplicate image_ids indexed once", embeddings_uri, skipped)

        t0 = time.perf_counter()
        nprobe = tuned = None
        ivf = _ivf_or_none(index)
        if ivf is not None:
            nprobe, tuned = (
                _tune_nprobe(index, probe, ivf.nlist, target_recall)
                if probe is not None
                else (min(ivf.nlist, 16), None)
            )
            ivf.nprobe = nprobe
        t_tune = time.perf_counter() - t0

        now = _now()
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
            index_file=_index_name(generation),
            id_parts=[_id_part_name(generation)],
            plan_reason=plan.reason,
            memory_budget=budget,
            build_seconds={
                "train": round(t_train, 3),
                "add": round(t_add, 3),
                "tune": round(t_tune, 3),
                "total": round(time.perf_counter() - t_start, 3),
            },
            created_at=now,
            vbatch_version=_vbatch_version(),
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
            added=added,
            skipped_existing=skipped,
        )
        _commit(storage, index, workdir / "ids.parquet", info, previous, workdir)
    logger.info(
        "index %s: %d vectors, %s, %.0f B/vector, nprobe=%s (recall@10 %s), %.1f s",
        out_uri,
        info.count,
        info.factory,
        info.bytes_per_vector,
        info.nprobe,
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
        index = _load_faiss(previous, storage, workdir)
        seen = set(_read_id_map(previous, storage).column("image_id").to_pylist())
        part = workdir / "ids-new.parquet"
        adder = _adder(index, _want_gpu(use_gpu))
        with pq.ParquetWriter(part, ID_MAP_SCHEMA) as writer:
            added, skipped = _add_stream(
                adder,
                iter_embeddings(stats.files, storage, stats.dim, add_batch_rows),
                writer,
                seen,
                previous.model_version,
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
        now = _now()
        info = IndexInfo(**{**asdict(previous), "added": added, "skipped_existing": skipped})
        info.count = int(index.ntotal)
        info.generation = generation
        info.index_file = _index_name(generation)
        info.id_parts = [*previous.id_parts, _id_part_name(generation)]
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
        info.vbatch_version = _vbatch_version()
        info.faiss_version = faiss.__version__
        _commit(storage, index, part, info, previous, workdir)
    return info


# -- searching ------------------------------------------------------------------------------------
class GalleryIndex:
    """A loaded gallery index: FAISS index, id map and manifest; safe to search from threads.

    Example::

        gallery = GalleryIndex.open("s3://bucket/reid/index", storage)
        scores, image_ids = gallery.search(query_embeddings, k=10)
    """

    def __init__(self, index: faiss.Index, image_ids: pa.Array, info: IndexInfo) -> None:
        self.index = index
        self.image_ids = image_ids
        self.info = info
        # built once: searches with the manifest's nprobe (the common case) reuse it
        self._params = _search_params(index, info.nprobe)

    @classmethod
    def open(cls, uri: str, storage: Storage) -> GalleryIndex:
        """Load the index at ``uri`` (the files named by its current manifest)."""
        info = read_info(uri, storage)
        with tempfile.TemporaryDirectory(prefix="vbatch-index-") as tmp:
            index = _load_faiss(info, storage, Path(tmp))
        ids = _read_id_map(info, storage).column("image_id").combine_chunks()
        ivf = _ivf_or_none(index)
        if ivf is not None and info.nprobe:
            ivf.nprobe = info.nprobe
        return cls(index, ids, info)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(
        self, embeddings: np.ndarray, k: int = 10, nprobe: int | None = None
    ) -> tuple[np.ndarray, list[list[str | None]]]:
        """The ``k`` most similar gallery images of each query.

        Args:
            embeddings: (Q, D) or (D,) float query embeddings; normalised here (cosine).
            k: neighbours per query.
            nprobe: inverted lists to visit (IVF only); default: the tuned value of the manifest.

        Returns:
            ``(scores (Q, k) float32 cosine similarities, image_ids Q lists of k)``, best first;
            when the index holds fewer than ``k`` reachable vectors the tail is
            ``(-inf, None)``.
        """
        x = np.array(embeddings, dtype=np.float32, ndmin=2, copy=True)
        if x.ndim != 2 or x.shape[1] != self.info.dim:
            raise ValueError(f"queries must be (Q, {self.info.dim}), got {np.shape(embeddings)}")
        faiss.normalize_L2(x)
        params = self._params if nprobe is None else _search_params(self.index, nprobe)
        scores, rows = self.index.search(x, k, params=params)
        if self.info.metric == "l2":  # squared distance of unit vectors: |x - y|^2 = 2 - 2 cos
            scores = np.where(rows >= 0, 1.0 - scores / 2.0, -np.inf).astype(np.float32)
        names = self.image_ids.take(pa.array(np.where(rows < 0, 0, rows).ravel())).to_pylist()
        flat_rows = rows.ravel()
        ids = [
            [names[i * k + j] if flat_rows[i * k + j] >= 0 else None for j in range(k)]
            for i in range(len(x))
        ]
        return scores, ids


def search(
    index: GalleryIndex, embeddings: np.ndarray, k: int = 10, nprobe: int | None = None
) -> tuple[np.ndarray, list[list[str | None]]]:
    """Functional form of :meth:`GalleryIndex.search`."""
    return index.search(embeddings, k=k, nprobe=nprobe)
