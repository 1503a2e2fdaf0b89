"""Person re-identification evaluation: mAP and CMC under the Market-1501 protocol.

Protocol (Zheng et al., "Scalable Person Re-identification: A Benchmark", ICCV 2015; the
single-query evaluation of the Market-1501 release, as re-implemented by torchreid's
``eval_market1501`` and fast-reid's ``evaluate_rank``):

* similarity is the cosine of the embeddings (both sides L2-normalised here);
* for each query, gallery images of the **same identity and the same camera** are removed from
  its ranking (they are "junk": trivially easy matches that the benchmark does not reward);
* gallery images of a **junk identity** (Market-1501 ``person_id == -1``: bad detections) are
  removed from every ranking;
* gallery images of a **distractor identity** (Market-1501 ``person_id == 0``) stay in the
  ranking as negatives and never count as a match;
* queries whose identity is junk or distractor are not evaluated; a query whose identity has no
  gallery image left after the removals is skipped and counted (``num_query`` -
  ``num_valid_query``);
* AP is the non-interpolated average precision over the ranked gallery (mean of precision at
  each correct match) — what torchreid / fast-reid / open-reid report. The original MATLAB
  release interpolates precision trapezoidally between recall steps, which gives slightly
  different (usually lower by < 0.5 points) numbers;
* CMC@k is the fraction of evaluated queries whose first correct match is within the top k.

Ties in similarity are broken by gallery row order (stable sort), so results are deterministic.
The query × gallery similarity is computed in chunks of queries, never as one Q×G matrix.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vbatch.models.registry import weights_version
from vbatch.operators.index.embeddings import list_parquet, open_parquet, vectors_from_arrow
from vbatch.operators.storage import Storage

logger = logging.getLogger(__name__)

MARKET1501_JUNK_IDS = (-1,)
MARKET1501_DISTRACTOR_IDS = (0,)


#: columns :func:`read_embeddings` adds: the file (an index into the schema metadata's file
#: list) and the row within it, so that an error names both
FILE_COLUMN, ROW_COLUMN, FILES_METADATA = "_file", "_row", b"vbatch.files"


def read_embeddings(uri: str, storage: Storage) -> pa.Table:
    """The embeddings table at ``uri`` (a job's output, a folder or a file), file by file, with
    the source file and the row within it of every row (``_file``, ``_row``) for messages.

    Raises:
        FileNotFoundError: no Parquet file under ``uri``.
    """
    files = list_parquet(storage, uri)
    tables = []
    for f, file_uri in enumerate(files):
        table = open_parquet(storage, file_uri).read()
        n = table.num_rows
        tables.append(
            table.append_column(FILE_COLUMN, pa.array(np.full(n, f, np.int32)))
            .append_column(ROW_COLUMN, pa.array(np.arange(n, dtype=np.int64)))
            .replace_schema_metadata(None)
        )
    table = pa.concat_tables(tables, promote_options="default")
    return table.replace_schema_metadata({FILES_METADATA: json.dumps(files)})


def _row_name(table: pa.Table, i: int) -> str:
    """``row 7 (image_id=x)`` (``image_id`` when the table has one), preceded by the file when
    the table comes from :func:`read_embeddings`."""
    names = table.column_names
    where = f"row {table.column(ROW_COLUMN)[i].as_py() if ROW_COLUMN in names else i}"
    files = _files(table)
    if files and FILE_COLUMN in names:
        where = f"{files[table.column(FILE_COLUMN)[i].as_py()]}: {where}"
    if "image_id" in names:
        where += f" (image_id={table.column('image_id')[i].as_py()})"
    return where


def _files(table: pa.Table) -> list[str]:
    """The files a table of :func:`read_embeddings` was read from (empty for other tables)."""
    metadata = table.schema.metadata or {}
    return json.loads(metadata[FILES_METADATA]) if FILES_METADATA in metadata else []


def _source(table: Any) -> str:
    """`` (in FILE)`` / `` (in FILE and N more)`` for a table of :func:`read_embeddings`."""
    files = _files(table) if isinstance(table, pa.Table) else []
    if not files:
        return ""
    more = f" and {len(files) - 1} more" if len(files) > 1 else ""
    return f" (in {files[0]}{more})"


def _person_ids(column: pa.ChunkedArray | pa.Array, name: str, table: pa.Table) -> np.ndarray:
    """``person_id`` as int64: integers as they are, strings of integers (``"0002"``, ``"-1"``,
    as parsed from Market-1501 file names) cast, so that the junk and distractor rules apply."""
    if pa.types.is_integer(column.type):
        if column.null_count:
            i = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
            raise ValueError(f"{name} table: {_row_name(table, i)} has no person_id")
        return column.to_numpy().astype(np.int64)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise ValueError(
            f"{name} table: person_id has type {column.type}; expected integers or strings of "
            "integers such as '0002' or '-1'"
        )
    out = np.empty(len(column), dtype=np.int64)
    for i, value in enumerate(column.to_pylist()):
        try:
            out[i] = int(value.strip())
        except (AttributeError, ValueError):
            raise ValueError(
                f"{name} table: {_row_name(table, i)} has person_id {value!r}, which is not an "
                "integer; the junk (-1) and distractor (0) rules need integer identities"
            ) from None
    return out


def _columns(table: Any, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(embeddings (N, D) float32 unit-norm, person_id (N,) int64, camera_id (N,)) of the ok rows.

    Raises:
        ValueError: a missing column, an ok row whose embedding is null, of another length,
            non-finite or zero (naming the row and image_id), or a person_id that is not an
            integer.
    """
    if not isinstance(table, pa.Table):
        table = pa.table(table)
    missing = [c for c in ("embedding", "person_id", "camera_id") if c not in table.column_names]
    if missing:
        raise ValueError(f"{name} table lacks column(s) {missing}")
    if ROW_COLUMN not in table.column_names:  # rows are named as the caller numbers them
        table = table.append_column(ROW_COLUMN, pa.array(np.arange(table.num_rows)))
    if "status" in table.column_names:
        table = table.filter(pc.fill_null(pc.equal(table.column("status"), "ok"), False))
    checked = vectors_from_arrow(table.column("embedding"))
    if len(checked.bad):
        i, n_bad = int(checked.bad[0]), len(checked.bad)
        more = f" ({n_bad} such rows in all)" if n_bad > 1 else ""
        raise ValueError(
            f"{name} table: {_row_name(table, i)} has status 'ok' but {checked.problems[i]}{more}"
        )
    pids = _person_ids(table.column("person_id").combine_chunks(), name, table)
    cams = _camera_ids(table.column("camera_id").combine_chunks())
    return checked.vectors, pids, cams


def _camera_ids(column: pa.Array) -> np.ndarray:
    """``camera_id`` as int64 when it holds integers or strings of integers (``"3"``), else as
    strings (``"c3"``): only compared for equality, but 3 and ``"3"`` must be equal."""
    values = column.to_pylist()
    try:
        return np.asarray([int(v) for v in values], dtype=np.int64)
    except (TypeError, ValueError):
        return np.asarray([None if v is None else str(v) for v in values], dtype=object)


def model_versions(table: Any) -> set[str] | None:
    """The ``model_version`` values of the ok rows (``None``: the table has no such column)."""
    if not isinstance(table, pa.Table):
        table = pa.table(table)
    if "model_version" not in table.column_names:
        return None
    if "status" in table.column_names:
        table = table.filter(pc.fill_null(pc.equal(table.column("status"), "ok"), False))
    return {str(v) for v in pc.unique(table.column("model_version")).to_pylist() if v is not None}


def check_model_versions(
    query: set[str] | None, gallery: set[str] | None, sources: tuple[str, str] = ("", "")
) -> None:
    """Refuse embeddings of different model versions: their similarities mean nothing.

    ``None`` (no ``model_version`` column) on either side is not checked; ``sources`` are
    appended to "query embeddings" and "the gallery" in the message (e.g. `` (in FILE)``).

    Raises:
        ValueError: the two sides differ or one side mixes versions.
    """
    if query is None or gallery is None or not query or not gallery:
        return
    # the weights decide comparability; a precision suffix ("+bf16") does not (cosine >= 0.999)
    query, gallery = {weights_version(v) for v in query}, {weights_version(v) for v in gallery}
    if query != gallery or len(query) > 1:
        raise ValueError(
            f"query embeddings{sources[0]} come from model_version {sorted(query)} and the "
            f"gallery{sources[1]} from {sorted(gallery)}: embeddings of different models are not comparable (pass "
            "--allow-model-mismatch / allow_model_mismatch=True to score them anyway)"
        )


def evaluate(
    query_table: Any,
    gallery_table: Any,
    k_max: int = 10,
    junk_ids: Sequence[Any] = MARKET1501_JUNK_IDS,
    distractor_ids: Sequence[Any] = MARKET1501_DISTRACTOR_IDS,
    chunk_elements: int = 1 << 22,
    allow_model_mismatch: bool = False,
) -> dict[str, Any]:
    """mAP and CMC of ``query_table`` against ``gallery_table`` (Market-1501 protocol).

    Args:
        query_table, gallery_table: embeddings tables (``pyarrow.Table`` or anything
            ``pa.table`` accepts) with ``embedding`` (list of float, length D), ``person_id`` and
            ``camera_id``; rows whose optional ``status`` is not ``"ok"`` are ignored.
            ``person_id`` may be integers or strings of integers (``"0002"``, ``"-1"``).
            Errors name the file and its row for tables of :func:`read_embeddings`.
        k_max: longest CMC rank reported.
        junk_ids: identities removed from every ranking (Market-1501: -1).
        distractor_ids: identities kept as negatives only (Market-1501: 0).
        chunk_elements: query × gallery similarities held at once (sets the query chunk).
        allow_model_mismatch: score tables whose optional ``model_version`` columns differ.

    Returns:
        ``{"mAP", "cmc@1", "cmc@5", "cmc@10" (those <= k_max), "cmc" (list, ranks 1..k_max),
        "num_query", "num_valid_query"}``; scores are fractions in [0, 1] and NaN when no
        query could be evaluated.

    Raises:
        ValueError: an invalid ok row (null, wrong-length, non-finite or zero embedding, a
            person_id that is not an integer), different dimensions or model versions.
    """
    if not allow_model_mismatch:
        check_model_versions(
            model_versions(query_table),
            model_versions(gallery_table),
            (_source(query_table), _source(gallery_table)),
        )
    q, q_pid, q_cam = _columns(query_table, "query")
    g, g_pid, g_cam = _columns(gallery_table, "gallery")
    if len(q) and len(g) and q.shape[1] != g.shape[1]:
        raise ValueError(
            f"query dim {q.shape[1]}{_source(query_table)} != gallery dim {g.shape[1]}"
            f"{_source(gallery_table)}"
        )
    if len(q) and len(g) and (q_cam.dtype == object) != (g_cam.dtype == object):
        raise ValueError(
            "camera_id holds integers on one side and other strings on the other "
            f"(query {q_cam[0]!r}, gallery {g_cam[0]!r}): same-camera matches could not be removed"
        )

    keep_g = ~np.isin(g_pid, np.asarray(junk_ids, dtype=g_pid.dtype))
    g, g_pid, g_cam = g[keep_g], g_pid[keep_g], g_cam[keep_g]
    g_distractor = np.isin(g_pid, np.asarray(distractor_ids, dtype=g_pid.dtype))
    excluded_ids = np.asarray([*junk_ids, *distractor_ids], dtype=q_pid.dtype)
    evaluable = np.flatnonzero(~np.isin(q_pid, excluded_ids))

    ap_sum, valid = 0.0, 0
    cmc_hits = np.zeros(k_max, dtype=np.int64)
    rows = max(1, chunk_elements // max(1, len(g)))
    for start in range(0, len(evaluable) if len(g) else 0, rows):
        sel = evaluable[start : start + rows]
        sim = q[sel] @ g.T  # (c, G)
        order = np.argsort(-sim, axis=1, kind="stable")
        same_pid = g_pid[order] == q_pid[sel, None]
        same_cam = g_cam[order] == q_cam[sel, None]
        kept = ~(same_pid & same_cam)
        hits = same_pid & kept & ~g_distractor[order]
        n_rel = hits.sum(axis=1)
        ok = n_rel > 0
        if not ok.any():
            continue
        kept, hits, n_rel = kept[ok], hits[ok], n_rel[ok]
        rank = np.cumsum(kept, axis=1)  # 1-based rank among the images left in the ranking
        precision_at_hits = np.where(hits, np.cumsum(hits, axis=1) / np.maximum(rank, 1), 0.0)
        ap_sum += float((precision_at_hits.sum(axis=1) / n_rel).sum())
        first = rank[np.arange(len(hits)), hits.argmax(axis=1)]
        cmc_hits += (first[:, None] <= np.arange(1, k_max + 1)[None, :]).sum(axis=0)
        valid += int(ok.sum())

    skipped = len(evaluable) - valid
    if skipped:
        logger.info("%d queries have no valid gallery match and were skipped", skipped)
    cmc = (cmc_hits / valid).tolist() if valid else [float("nan")] * k_max
    result: dict[str, Any] = {
        "mAP": ap_sum / valid if valid else float("nan"),
        **{f"cmc@{r}": cmc[r - 1] for r in (1, 5, 10) if r <= k_max},
        "cmc": cmc,
        "num_query": len(q),
        "num_valid_query": valid,
    }
    return result
