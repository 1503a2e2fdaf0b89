"""What the report reads of a finished run, at a cost bounded for million-row tables.

Two passes over the committed results table (:func:`vbatch.operators.tables.results_files`):

1. every row, only the light columns (status, error class, sizes, foreground ratio, metrics, and
   ``image_id`` for the deterministic sample key), streamed in batches and kept as flat numpy
   arrays: 9 bytes a row plus 4 per numeric column;
2. only the row groups holding a row the report shows (the sample, the extremes, error examples),
   with the columns that describe a row (URIs, error text …).

Bytes read are counted from the Parquet footers (compressed column-chunk sizes of what was read).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vbatch.operators.quality import HIGHER_IS_BETTER
from vbatch.operators.storage import Storage, join
from vbatch.operators.tables import read_text, results_files

logger = logging.getLogger(__name__)

#: numeric columns read for every row (those present)
NUMERIC = ("width", "height", "foreground_ratio", *HIGHER_IS_BETTER)
#: columns read for the rows shown (their numeric columns and status come from pass 1)
DETAIL = (
    "image_id",
    "uri",
    "error",
    "error_class",
    "mask_uri",
    "matte_uri",
    "cutout_uri",
    "composite_uri",
    "gt_mask_uri",
    "gt_error",
    "video_id",
    "query",
    "query_index",
    "frame_index",
    "timestamp_s",
    "task",
    "query_id",
)
#: error rows shown per error class
ERROR_EXAMPLES = 3
#: rows per batch of the light pass: ~1-5 MB of Arrow data at a time
BATCH_ROWS = 65_536
#: rows per batch when picking the shown rows out of a row group (URIs: ~200 bytes a row)
DETAIL_BATCH_ROWS = 8_192


@dataclass
class Light:
    """The light columns of every row, flat, plus where each row lives."""

    rows: int = 0
    #: the position of each file's first row (positions count rows over all files in order)
    file_starts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    #: 64-bit hash of the id: the deterministic sample takes the smallest keys; --compare joins
    #: two runs on it (a collision among a million ids has odds of ~3e-8)
    key: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    ok: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    numeric: dict[str, np.ndarray] = field(default_factory=dict)
    by_error_class: dict[str, int] = field(default_factory=dict)
    #: a few row positions (into the arrays above) per error class
    error_examples: dict[str, list[int]] = field(default_factory=dict)
    columns: list[str] = field(default_factory=list)
    bytes_read: int = 0


@dataclass
class RunData:
    """A run as the report sees it."""

    out: str
    files: list[str]
    record: dict[str, Any]
    light: Light
    #: base folder for relative input URIs (the manifest's folder, from run.json)
    base_uri: str


def read_record(out: str, storage: Storage) -> dict[str, Any]:
    """``<out>/run.json`` (``{}`` when missing or unreadable)."""
    text = read_text(join(out, "run.json"), storage)
    if not text:
        return {}
    try:
        return json.loads(text)
    except ValueError:
        logger.warning("%s/run.json is not JSON; the report leaves the run's facts out", out)
        return {}


def _open(uri: str, storage: Storage) -> pq.ParquetFile:
    fs, path = storage.arrow_fs(uri)
    return pq.ParquetFile(fs.open_input_file(path))


def _chunk_bytes(meta: pq.FileMetaData, rg: int, names: set[str]) -> int:
    group = meta.row_group(rg)
    return sum(
        group.column(i).total_compressed_size
        for i in range(group.num_columns)
        if group.column(i).path_in_schema in names
    )


def id_key(value: object) -> int:
    """The 64-bit key of an id (blake2b): stable across processes, unlike ``hash``."""
    return int.from_bytes(hashlib.blake2b(str(value).encode(), digest_size=8).digest(), "little")


#: the columns that identify a row, by kind of table: images; video frames (one row per video,
#: query and frame); search hits (first: their ``image_id`` is the hit's, not the row's)
ROW_KEYS = (("query_id", "rank"), ("image_id",), ("video_id", "query_index", "frame_index"))


def _key_columns(names: list[str]) -> list[str]:
    for key in ROW_KEYS:
        if key[0] in names:
            return [c for c in key if c in names]
    return []


def _row_ids(batch: pa.RecordBatch, columns: list[str], first: int) -> list[str]:
    """One string per row that identifies it (its key columns joined; else its position)."""
    if not columns:
        return [str(first + i) for i in range(batch.num_rows)]
    if len(columns) == 1:
        return [str(v) for v in batch.column(columns[0]).to_pylist()]
    parts = [batch.column(c).to_pylist() for c in columns]
    return ["\x1f".join(map(str, values)) for values in zip(*parts, strict=True)]


def _positions_to_rows(light: Light, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(file index, row in that file) of global row positions."""
    files = np.searchsorted(light.file_starts, positions, side="right") - 1
    return files, positions - light.file_starts[files]


def read_light(files: list[str], storage: Storage) -> Light:
    """Pass 1: the light columns of every row of ``files``, streamed in batches of
    :data:`BATCH_ROWS` rows (memory: the flat arrays, not the table)."""
    import pyarrow.compute as pc

    light = Light()
    keys: list[np.ndarray] = []
    oks: list[np.ndarray] = []
    files_meta = [_open(uri, storage) for uri in files]
    present = sorted({n for pf in files_meta for n in pf.schema_arrow.names})
    numeric: dict[str, list[np.ndarray]] = {name: [] for name in NUMERIC if name in present}
    examples: dict[str, list[int]] = defaultdict(list)
    by_class: dict[str, int] = defaultdict(int)
    starts = []
    for pf in files_meta:
        starts.append(light.rows)
        names = pf.schema_arrow.names
        key_cols = _key_columns(names)
        cols = [c for c in ("status", "error_class", *numeric) if c in names]
        cols += [c for c in key_cols if c not in cols]
        light.bytes_read += sum(
            _chunk_bytes(pf.metadata, rg, set(cols)) for rg in range(pf.num_row_groups)
        )
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=cols):
            n = batch.num_rows
            ids = _row_ids(batch, key_cols, light.rows)
            keys.append(np.fromiter((id_key(i) for i in ids), np.uint64, count=n))
            ok = (
                pc.equal(batch.column("status"), "ok")
                .fill_null(False)
                .to_numpy(zero_copy_only=False)
                if "status" in cols
                else np.ones(n, bool)
            )
            oks.append(ok)
            for name, parts in numeric.items():
                parts.append(
                    batch.column(name).to_numpy(zero_copy_only=False).astype(np.float32)
                    if name in cols
                    else np.full(n, np.nan, np.float32)
                )
            if not ok.all():
                classes = (
                    batch.column("error_class").to_pylist() if "error_class" in cols else [None] * n
                )
                for i in np.flatnonzero(~ok).tolist():
                    cls = classes[i] or "unclassified"
                    by_class[cls] += 1
                    if len(examples[cls]) < ERROR_EXAMPLES:
                        examples[cls].append(light.rows + i)
            light.rows += n
    light.file_starts = np.array(starts, np.int64)
    if keys:
        light.key = np.concatenate(keys)
        light.ok = np.concatenate(oks)
        light.numeric = {k: np.concatenate(v) for k, v in numeric.items()}
    light.by_error_class = dict(by_class)
    light.error_examples = dict(examples)
    light.columns = present
    return light


def _with_light(row: dict[str, Any], light: Light, p: int) -> dict[str, Any]:
    """``row`` plus what pass 1 already holds: status and the numeric columns (null as None)."""
    row["status"] = "ok" if light.ok[p] else "error"
    for name, values in light.numeric.items():
        v = float(values[p])
        row[name] = None if not np.isfinite(v) else (int(v) if name in ("width", "height") else v)
    return row


def read_rows(
    files: list[str], storage: Storage, light: Light, positions: list[int]
) -> tuple[dict[int, dict[str, Any]], int]:
    """Pass 2: the detail columns of the rows at ``positions``, reading only the row groups that
    hold them, in small batches.

    Returns:
        ({position: row as a dict}, bytes read).
    """
    wanted = np.unique(np.asarray(positions, np.int64))
    file_of, row_of = _positions_to_rows(light, wanted)
    out: dict[int, dict[str, Any]] = {}
    read = 0
    for fi in np.unique(file_of).tolist():
        pf = _open(files[fi], storage)
        cols = [c for c in DETAIL if c in pf.schema_arrow.names]
        in_file = {
            int(r): int(p)
            for r, p in zip(row_of[file_of == fi], wanted[file_of == fi], strict=True)
        }
        group_start = 0
        for rg in range(pf.num_row_groups):
            size = pf.metadata.row_group(rg).num_rows
            rows_here = sorted(r for r in in_file if group_start <= r < group_start + size)
            if rows_here:
                read += _chunk_bytes(pf.metadata, rg, set(cols))
                offset = group_start
                for batch in pf.iter_batches(
                    batch_size=DETAIL_BATCH_ROWS, row_groups=[rg], columns=cols
                ):
                    take = [r for r in rows_here if offset <= r < offset + batch.num_rows]
                    if take:
                        picked = batch.take(pa.array([r - offset for r in take])).to_pylist()
                        for r, row in zip(take, picked, strict=True):
                            out[in_file[r]] = _with_light(row, light, in_file[r])
                    offset += batch.num_rows
            group_start += size
    return out, read


def load_run(out: str, storage: Storage) -> RunData:
    """Pass 1 over the run at ``out`` plus its run.json."""
    from vbatch.operators.storage import parent

    record = read_record(out, storage)
    files = results_files(out, storage)
    light = read_light(files, storage)
    manifests = record.get("manifest_files") or []
    base = parent(manifests[0]) if manifests else out
    return RunData(out=out, files=files, record=record, light=light, base_uri=base)


# -- choosing the rows shown ----------------------------------------------------------------------
def sample_positions(light: Light, n: int) -> list[int]:
    """The deterministic sample: the ``n`` ok rows with the smallest id hash (the same rows
    whatever the table's file layout or row order), in id-hash order."""
    ok = np.flatnonzero(light.ok)
    if n <= 0 or ok.size == 0:
        return []
    k = min(n, ok.size)
    part = ok[np.argpartition(light.key[ok], k - 1)[:k]]
    return part[np.argsort(light.key[part], kind="stable")].tolist()


def extreme_positions(light: Light, column: str, n: int, largest: bool) -> list[int]:
    """The ``n`` ok rows with the smallest (or largest) finite ``column``."""
    values = light.numeric.get(column)
    if values is None:
        return []
    idx = np.flatnonzero(light.ok & np.isfinite(values))
    if idx.size == 0:
        return []
    v = -values[idx] if largest else values[idx]
    k = min(n, idx.size)
    top = idx[np.argpartition(v, k - 1)[:k]]
    order = np.argsort(-values[top] if largest else values[top], kind="stable")
    return top[order].tolist()
