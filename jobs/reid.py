"""``vbatch reid``: embed person crops, build/extend a FAISS gallery index, search it, evaluate.

* ``embed`` is the image job of :mod:`vbatch.jobs.segment` with the ``reid`` model: one row per manifest
  row with an L2-normalised 1536-d ``embedding`` (null on error rows), under ``<out>/results/``.
* ``index``/``add`` build and extend the gallery (:mod:`vbatch.operators.index`).
* ``search`` embeds query images with the same model (or takes an embeddings table) and returns
  the top-k gallery ids per query, and an error row for each query that could not be searched;
  a manifest or table of queries with ``--out`` is a Ray Data job (:mod:`vbatch.jobs.reid_search`).
* ``eval`` scores a query table against a gallery table (Market-1501 protocol,
  :mod:`vbatch.operators.reid_eval`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from vbatch.jobs.segment import ImageJobConfig, JobSummary, run_image_job
from vbatch.jobs.summary import Counts, RunClock, count_rows
from vbatch.models import load_model
from vbatch.models.registry import weights_version
from vbatch.operators.decode import decode_image
from vbatch.operators.index import GalleryIndex
from vbatch.operators.index.embeddings import vector_problems, vectors_from_arrow
from vbatch.operators.redact import redact_uri
from vbatch.operators.storage import Storage, join

logger = logging.getLogger(__name__)


def run_embed(cfg: ImageJobConfig, clock: RunClock | None = None) -> JobSummary:
    """Embeddings for every row of an image manifest: the image job with the ``reid`` model,
    whatever ``cfg.task`` says (``cfg`` itself is left as it is)."""
    return run_image_job(dataclasses.replace(cfg, task="reid"), clock, command="reid embed")


@dataclass
class Queries:
    """Query vectors, one per query, and why a query cannot be searched.

    Attributes:
        ids: (Q,) query ids (image ids or URIs).
        vectors: (Q, D) float32, L2-normalised; zero on failed queries.
        errors: (Q,) ``None`` or what went wrong (unreadable image, invalid embedding…).
        model_version: the model that embedded the queries (``None``: unknown).
    """

    ids: list[str]
    vectors: np.ndarray
    errors: list[str | None]
    model_version: str | None

    @property
    def failed(self) -> list[tuple[str, str]]:
        """``(query id, error)`` of every failed query, in query order."""
        return [(q, e) for q, e in zip(self.ids, self.errors, strict=True) if e is not None]


def embed_images(
    uris: list[str],
    model_dir: str,
    storage: Storage,
    batch_size: int = 32,
    precision: str | None = None,
) -> Queries:
    """Embed a few query images on this machine (no Ray); an unreadable image fails alone.

    Args:
        uris: query image URIs (also the query ids).
        model_dir: the re-ID model directory.
        storage: the storage layer.
        batch_size: images per model call.
        precision: the model's precision (``None``: its default, ``ModelEntry.default_precision``;
            ``"auto"`` is resolved for this machine).

    Returns:
        :class:`Queries` with the model's version; a failed image's error names its URI.
    """
    from vbatch.models.base import resolve_device
    from vbatch.models.precision import resolve_precision
    from vbatch.models.registry import model_entry

    device = resolve_device(None)
    chosen, reason = resolve_precision(precision or model_entry("reid").default_precision, device)
    logger.info("reid queries at %s", reason)
    predictor = load_model("reid", storage.localize_dir(model_dir), device, precision=chosen)
    errors: list[str | None] = [None] * len(uris)
    embedded: dict[int, np.ndarray] = {}
    for start in range(0, len(uris), batch_size):
        images: dict[int, np.ndarray] = {}
        for i in range(start, min(start + batch_size, len(uris))):
            try:
                images[i] = decode_image(storage.read_bytes(uris[i]))
            except Exception as err:  # an unreadable query is that query's error, not the run's
                errors[i] = redact_uri(f"cannot read image {uris[i]}: {type(err).__name__}: {err}")
        if images:
            predicted = predictor.predict(list(images.values()))
            embedded.update(zip(images, predicted, strict=True))
    dim = len(next(iter(embedded.values()))) if embedded else 0
    vectors = np.zeros((len(uris), dim), dtype=np.float32)
    for i, vector in embedded.items():
        vectors[i] = vector
    for i, problem in enumerate(vector_problems(vectors)):
        if errors[i] is None and problem is not None:
            errors[i] = redact_uri(f"{uris[i]}: the model returned a {problem}")
    bad = [e is not None for e in errors]
    vectors[bad] = 0
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True).clip(min=1e-12)
    return Queries(list(uris), vectors, errors, predictor.model_version)


def queries_from_table(table: pa.Table, dim: int | None = None, uri: str = "") -> Queries:
    """Every row of an embeddings table (``reid embed`` output) as a query.

    Rows whose ``status`` is not ``ok`` fail with their ``error``; ok rows without a valid
    embedding (null, another length than ``dim``, non-finite, zero norm) fail saying why.

    Args:
        table: the queries.
        dim: the gallery's dimension (``None``: the most common length of the rows).
        uri: where the table was read, for messages.

    Raises:
        ValueError: a missing column, or ok rows of several model versions.
    """
    where = f"query embeddings {uri}".rstrip()
    missing = [c for c in ("image_id", "embedding") if c not in table.column_names]
    if missing:
        raise ValueError(f"{where}: the table lacks column(s) {missing}")
    n = table.num_rows
    status = table.column("status").to_pylist() if "status" in table.column_names else ["ok"] * n
    error_col = table.column("error").to_pylist() if "error" in table.column_names else [None] * n
    checked = vectors_from_arrow(table.column("embedding"), dim)
    vectors, problems = checked.vectors, checked.problems
    errors: list[str | None] = []
    for st, err, problem in zip(status, error_col, problems, strict=True):
        if st != "ok":
            errors.append(f"embedding failed ({st}): {err}" if err else f"status {st!r}")
        else:
            errors.append(problem)
    versions: set[str] = set()
    if "model_version" in table.column_names:
        versions = {
            str(v)
            for v, e in zip(table.column("model_version").to_pylist(), errors, strict=True)
            if e is None and v is not None
        }
    if len(versions) > 1:
        raise ValueError(f"{where}: ok rows mix model versions {sorted(versions)}")
    ids = [str(v) for v in table.column("image_id").to_pylist()]
    return Queries(ids, vectors, errors, next(iter(versions), None))


def search_counts(queries: Queries) -> Counts:
    """The queries by status (``ok`` or ``error``) and error class, for the run's summary and
    exit code (:func:`vbatch.jobs.summary.job_record`): a failed query is an error row."""
    failed = [e is not None for e in queries.errors]
    table = pa.table(
        {
            "query_id": pa.array(queries.ids, pa.string()),
            "status": pa.array(["error" if f else "ok" for f in failed], pa.string()),
            "error": pa.array(queries.errors, pa.string()),
        }
    )
    return count_rows(table, "query_id")


def check_model_version(queries: Queries, index: GalleryIndex, allow_mismatch: bool) -> None:
    """Refuse queries embedded by another model version than the gallery's.

    Raises:
        ValueError: the versions differ (and ``allow_mismatch`` is false).
    """
    gallery = index.info.model_version
    if allow_mismatch or queries.model_version is None or gallery is None:
        return
    if weights_version(queries.model_version) != weights_version(gallery):
        raise ValueError(
            f"queries come from model_version {queries.model_version!r}, the gallery at "
            f"{index.info.uri} from {gallery!r}: embeddings of different models are not "
            "comparable (--allow-model-mismatch to search anyway)"
        )


SEARCH_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("rank", pa.int32()),
        ("image_id", pa.string()),
        ("score", pa.float32()),
        ("status", pa.string()),
        ("error", pa.string()),
    ]
)


def search_table(
    index: GalleryIndex,
    queries: Queries,
    k: int,
    nprobe: int | None = None,
    rerank: int | None = None,
) -> pa.Table:
    """Top-k hits per query as a long table, in query order (``nprobe``, ``rerank``: see
    :meth:`GalleryIndex.search`).

    Returns:
        ``query_id, rank, image_id, score, status, error``: ``k`` rows per searched query (fewer
        when the gallery is smaller), status ``ok``; one row per failed query, status
        ``error``, with its error and null rank, image_id and score.
    """
    good = [i for i, e in enumerate(queries.errors) if e is None]
    hits: dict[int, tuple[np.ndarray, list[str | None]]] = {}
    if good:
        scores, ids = index.search(queries.vectors[good], k=k, nprobe=nprobe, rerank=rerank)
        hits = {q: (scores[j], ids[j]) for j, q in enumerate(good)}
    rows: list[dict[str, Any]] = []
    for i, query_id in enumerate(queries.ids):
        if i not in hits:
            rows.append({"query_id": query_id, "status": "error", "error": queries.errors[i]})
            continue
        scores_i, ids_i = hits[i]
        rows += [
            {
                "query_id": query_id,
                "rank": r + 1,
                "image_id": image_id,
                "score": float(scores_i[r]),
                "status": "ok",
            }
            for r, image_id in enumerate(ids_i)
            if image_id is not None
        ]
    return pa.Table.from_pylist(rows, schema=SEARCH_SCHEMA)


def write_parquet(table: pa.Table, uri: str, storage: Storage) -> str:
    """Write ``table`` to ``uri`` (a ``.parquet`` file, else ``<uri>/search.parquet``); returns
    the file's URI."""
    import io

    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    target = uri if uri.endswith(".parquet") else join(uri, "search.parquet")
    storage.write_bytes(target, buf.getvalue())
    return target
