"""What the report reads of a finished run, at a cost bounded for million-row tables.

Two passes over the committed results table (:func:`vbatch.operators.tables.results_files`):

1. every row group, only the light columns (status, error class, sizes, foreground ratio, metrics,
   and ``image_id`` for the deterministic sample key), kept as flat numpy arrays: ~50 bytes a row;
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
#: columns read for the rows shown
DETAIL = (
    "image_id",
    "uri",
    "status",
    "error",
    "error_class",
    "width",
    "height",
    "foreground_ratio",
    "mask_uri",
    "matte_uri",
    "cutout_uri",
    "composite_uri",
    "gt_mask_uri",
    "gt_error",
    "video_id",
    "query",
    "frame_index",
    "task",
    *HIGHER_IS_BETTER,
)
#: error rows shown per error class
ERROR_EXAMPLES = 3


@dataclass
class Light:
    """The light columns of every row, flat, plus where each row lives."""

    rows: int = 0
    #: (file index, row group, row in group) per row
    where: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.int32))
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


def _id_column(names: list[str]) -> str | None:
    for name in ("image_id", "video_id", "query_id"):
        if name in names:
            return name
    return None


def read_light(files: list[str], storage: Storage) -> Light:
    """Pass 1: the light columns of every row of ``files``."""
    light = Light()
    where: list[np.ndarray] = []
    keys: list[np.ndarray] = []
    oks: list[np.ndarray] = []
    numeric: dict[str, list[np.ndarray]] = defaultdict(list)
    present: set[str] = set()
    examples: dict[str, list[int]] = defaultdict(list)
    by_class: dict[str, int] = defaultdict(int)
    for fi, uri in enumerate(files):
        pf = _open(uri, storage)
        names = pf.schema_arrow.names
        present.update(names)
        id_col = _id_column(names)
        cols = [c for c in ("status", "error_class", *NUMERIC) if c in names]
        cols += [id_col] if id_col else []
        for rg in range(pf.num_row_groups):
            t = pf.read_row_group(rg, columns=cols)
            light.bytes_read += _chunk_bytes(pf.metadata, rg, set(cols))
            n = t.num_rows
            where.append(
                np.stack(
                    [
                        np.full(n, fi, np.int32),
                        np.full(n, rg, np.int32),
                        np.arange(n, dtype=np.int32),
                    ],
                    axis=1,
                )
            )
            ids = (
                t.column(id_col).to_pylist() if id_col else [str(light.rows + i) for i in range(n)]
            )
            keys.append(np.fromiter((id_key(i) for i in ids), np.uint64, count=n))
            status = (
                t.column("status").to_numpy(zero_copy_only=False)
                if "status" in cols
                else np.full(n, "ok", object)
            )
            ok = status == "ok"
            oks.append(ok)
            for name in NUMERIC:
                values = (
                    t.column(name).to_numpy(zero_copy_only=False).astype(np.float32)
                    if name in cols
                    else np.full(n, np.nan, np.float32)
                )
                numeric[name].append(values)
            if not ok.all():
                classes = (
                    t.column("error_class").to_pylist() if "error_class" in cols else [None] * n
                )
                for i in np.flatnonzero(~ok).tolist():
                    cls = classes[i] or "unclassified"
                    by_class[cls] += 1
                    if len(examples[cls]) < ERROR_EXAMPLES:
                        examples[cls].append(light.rows + i)
            light.rows += n
    if where:
        light.where = np.concatenate(where)
        light.key = np.concatenate(keys)
        light.ok = np.concatenate(oks)
        light.numeric = {k: np.concatenate(v) for k, v in numeric.items()}
    light.by_error_class = dict(by_class)
    light.error_examples = dict(examples)
    light.columns = sorted(present)
    return light


def read_rows(
    files: list[str], storage: Storage, light: Light, positions: list[int]
) -> tuple[dict[int, dict[str, Any]], int]:
    """Pass 2: the detail columns of the rows at ``positions``.

    Returns:
        ({position: row as a dict}, bytes read).
    """
    wanted: dict[tuple[int, int], list[int]] = defaultdict(list)
    for p in sorted(set(positions)):
        fi, rg, _ = light.where[p].tolist()
        wanted[(fi, rg)].append(p)
    out: dict[int, dict[str, Any]] = {}
    read = 0
    for (fi, rg), group in sorted(wanted.items()):
        pf = _open(files[fi], storage)
        cols = [c for c in DETAIL if c in pf.schema_arrow.names]
        table: pa.Table = pf.read_row_group(rg, columns=cols)
        read += _chunk_bytes(pf.metadata, rg, set(cols))
        rows = table.take(pa.array([int(light.where[p][2]) for p in group])).to_pylist()
        out.update(zip(group, rows, strict=True))
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
