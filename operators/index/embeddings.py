"""Reading ``reid embed`` tables: a cheap scan, streamed batches and a uniform training sample.

Embeddings come from ``reid embed``: Parquet files (one file or a folder, local or ``s3://``) with
``image_id``, ``status``, ``embedding`` (``fixed_size_list<float32, D>``, L2-normalised, null on
error rows) and ``model_version``. Only ``status == "ok"`` rows are indexed. The tables are
streamed with ``ParquetFile.iter_batches``; at no point is a whole table in memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vbatch.operators.storage import Storage
from vbatch.operators.tables import results_files

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


#: Parquet read through a buffered stream, page by page: Arrow's default (``pre_buffer``, no
#: stream buffer) reads a row group's whole column chunk at once. On a 50k-row row group of 1536-d
#: vectors (307 MB), iterating 4096-row batches peaks at 265 MiB resident this way against 557 MiB
#: pre-buffered (877 MiB with the former 16384-row batches).
READ_BUFFER_BYTES = 4 << 20
#: rows per batch when streaming embeddings (4096 x 1536-d float32 = 25 MB)
BATCH_ROWS = 4096


def open_parquet(storage: Storage, file_uri: str) -> pq.ParquetFile:
    fs, path = storage.arrow_fs(file_uri)
    return pq.ParquetFile(fs.open_input_file(path), buffer_size=READ_BUFFER_BYTES, pre_buffer=False)


def list_parquet(storage: Storage, uri: str) -> list[str]:
    """The Parquet files of an embeddings table: a job's committed generation when ``uri`` is a
    job's output (never its staging or uncommitted files), else every visible file below it."""
    files = results_files(uri, storage)
    if not files:
        raise FileNotFoundError(f"no Parquet files under {uri}")
    return files


def scan_embeddings(uri: str, storage: Storage) -> TableStats:
    """Count the ok rows, check one dimension and one model version (reads no embeddings).

    Raises:
        ValueError: a missing column, mixed dimensions or mixed model versions, naming the file.
        FileNotFoundError: no Parquet file under ``uri``.
    """
    files = list_parquet(storage, uri)
    count = errors = 0
    dim: int | None = None
    versions: dict[str, str] = {}  # version -> first file seen in
    for file_uri in files:
        pf = open_parquet(storage, file_uri)
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
            # the most common length of the first rows, not the first row's: a damaged first
            # row is then the one named (iter_embeddings checks every row against this)
            first = next(pf.iter_batches(batch_size=1024, columns=["embedding"]))
            file_dim = common_length(first.column("embedding"))
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


# A unit vector has norm 1; anything this small is a zero vector that normalisation cannot fix.
MIN_NORM = 1e-6


def _problem_masks(vectors: np.ndarray) -> list[tuple[np.ndarray, str]]:
    """(rows (N,) bool, problem) of each kind of unusable vector, disjoint, computed at once."""
    finite = np.isfinite(vectors).all(axis=1)
    with np.errstate(over="ignore", invalid="ignore"):
        norms = np.linalg.norm(vectors, axis=1)
    return [
        (~finite, "non-finite embedding (NaN or inf)"),
        (finite & ~np.isfinite(norms), "embedding too large to normalise"),
        (finite & np.isfinite(norms) & (norms < MIN_NORM), "zero-norm embedding"),
    ]


def vector_problems(vectors: np.ndarray) -> list[str | None]:
    """Why each row of ``vectors`` cannot be searched or indexed (``None``: it can).

    Args:
        vectors: (N, D) float32.

    Returns:
        N entries: ``"non-finite embedding (NaN or inf)"``, ``"embedding too large to
        normalise"``, ``"zero-norm embedding"`` or ``None``.
    """
    problems: list[str | None] = [None] * len(vectors)
    for rows, problem in _problem_masks(vectors):
        for row in np.flatnonzero(rows).tolist():  # Python touches the bad rows only
            problems[row] = problem
    return problems


def common_length(embeddings: pa.Array | pa.ChunkedArray) -> int | None:
    """The most common length of the non-null rows of a list column (``None``: no such row);
    ties go to the first of them in row order."""
    lengths = pc.list_value_length(embeddings).drop_null()
    if len(lengths) == 0:
        return None
    values, first, counts = np.unique(
        lengths.to_numpy(zero_copy_only=False), return_index=True, return_counts=True
    )
    best = np.flatnonzero(counts == counts.max())
    return int(values[best[np.argmin(first[best])]])


@dataclass
class CheckedVectors:
    """The vectors of a list column, each row checked on its own.

    Attributes:
        vectors: (N, D) float32 unit rows; zero on problem rows.
        problems: (N,) ``None`` or why the row is unusable (null, wrong length, non-finite,
            zero norm).
        bad: (N,) int64, the rows with a problem, ascending.
        dim: the dimension checked against (``None``: every row is null).
    """

    vectors: np.ndarray
    problems: list[str | None]
    bad: np.ndarray
    dim: int | None


def vectors_from_arrow(
    embeddings: pa.Array | pa.ChunkedArray, dim: int | None = None
) -> CheckedVectors:
    """Checked, L2-normalised vectors of a list column, row by row.

    Every row's own length is checked (its list offsets, vectorised), not only the total number
    of values: rows of 1535 and 1537 values add up to two rows of 1536 and would silently shift.

    Args:
        embeddings: ``list<float>`` / ``fixed_size_list<float, D>`` column, nulls allowed.
        dim: expected dimension; ``None`` takes the most common length of the non-null rows
            (:func:`common_length`), so that the odd rows are the ones flagged.

    Returns:
        :class:`CheckedVectors`: a problem row's vector is zero and its problem says why.
    """
    if isinstance(embeddings, pa.ChunkedArray):
        embeddings = (
            embeddings.combine_chunks() if embeddings.num_chunks else pa.array([], embeddings.type)
        )
    n = len(embeddings)
    if dim is None:
        dim = common_length(embeddings)
    if dim is None:
        return CheckedVectors(
            np.zeros((n, 0), np.float32), ["no embedding"] * n, np.arange(n), None
        )
    lengths = pc.list_value_length(embeddings).to_numpy(zero_copy_only=False)
    null = np.asarray(embeddings.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    good = ~null & (np.where(null, -1, lengths) == dim)
    vectors = np.zeros((n, dim), dtype=np.float32)
    if good.any():
        values = embeddings.filter(pa.array(good)).flatten()
        vectors[good] = values.to_numpy(zero_copy_only=False).reshape(-1, dim)
    problems: list[str | None] = [None] * n
    bad = ~good
    for rows, problem in _problem_masks(vectors):
        rows &= good  # a wrong-length row's zero vector says nothing more
        for row in np.flatnonzero(rows).tolist():  # Python touches the bad rows only
            problems[row] = problem
        bad |= rows
    for row in np.flatnonzero(~good).tolist():
        problems[row] = (
            "no embedding"
            if null[row]
            else f"embedding has {int(lengths[row])} values, expected {dim}"
        )
    vectors[bad] = 0
    # the tables promise unit norm; renormalising is cheap and makes IP == cosine for sure
    faiss.normalize_L2(vectors)
    return CheckedVectors(vectors, problems, np.flatnonzero(bad).astype(np.int64), dim)


def iter_embeddings(
    files: Sequence[str],
    storage: Storage,
    dim: int,
    batch_rows: int = BATCH_ROWS,
    start: int = 0,
) -> Iterator[EmbeddingBatch]:
    """Stream the ok rows of ``files`` in batches of at most ``batch_rows`` input rows.

    ``start`` is the ordinal of the first ok row of ``files[0]`` (a shard that begins inside the
    table passes its files' position, so that ordinals stay those of the whole table).

    Raises:
        ValueError: an ok row without a valid embedding (null, wrong length, non-finite, zero
            norm), naming the file, the row and the image_id.
    """
    ordinal = start
    for file_uri in files:
        pf = open_parquet(storage, file_uri)
        file_row = 0
        for batch in pf.iter_batches(
            batch_size=batch_rows, columns=["image_id", "status", "embedding"]
        ):
            ok = pc.fill_null(pc.equal(batch.column("status"), "ok"), False)
            rows = file_row + np.flatnonzero(ok.to_numpy(zero_copy_only=False))
            file_row += batch.num_rows
            batch = batch.filter(ok)
            if batch.num_rows == 0:
                continue
            checked = vectors_from_arrow(batch.column("embedding"), dim)
            if len(checked.bad):
                i, n_bad = int(checked.bad[0]), len(checked.bad)
                more = f" (and {n_bad - 1} more rows of this batch)" if n_bad > 1 else ""
                raise ValueError(
                    f"{file_uri}: row {int(rows[i])} (image_id={batch.column('image_id')[i]}) "
                    f"has status 'ok' but {checked.problems[i]}{more}"
                )
            n = batch.num_rows
            yield EmbeddingBatch(
                batch.column("image_id").cast(pa.string()),
                checked.vectors,
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
    batch_rows: int = BATCH_ROWS,
) -> tuple[np.ndarray, np.ndarray]:
    """A uniform sample of ``size`` ok rows, read in one streaming pass.

    Returns:
        ``(vectors (S, D) float32, ordinals (S,) int64)`` in random order.
    """
    size = min(size, count)
    rng = np.random.default_rng(seed)
    wanted = np.sort(rng.choice(count, size=size, replace=False))
    perm = rng.permutation(size)
    # the i-th wanted row (in table order) goes to slot where[i] of the random order: filled in
    # place, never permuted afterwards (which would hold the sample twice)
    where = np.empty(size, dtype=np.int64)
    where[perm] = np.arange(size)
    out = np.empty((size, dim), dtype=np.float32)
    filled = 0
    for batch in iter_embeddings(files, storage, dim, batch_rows):
        lo, hi = np.searchsorted(wanted, [batch.ordinals[0], batch.ordinals[-1] + 1])
        if hi > lo:
            out[where[lo:hi]] = batch.vectors[wanted[lo:hi] - batch.ordinals[0]]
            filled += hi - lo
        if filled == size:
            break
    return out, wanted[perm]
