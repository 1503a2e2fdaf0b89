"""How a job's rows are keyed in its Iceberg table, and the run's keys gathered before a commit.

Each job's key is declared once, in :data:`JOB_KEYS`. A run's rows are streamed from its staged
Parquet files (or a table), so a run of millions of rows is never held in memory: only its key
columns are, as one string per row (:func:`composite`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vbatch.operators.lakehouse.catalog import IcebergError
from vbatch.operators.storage import Storage

#: the messages of ``vbatch.schemas.images.key_error`` that make a row unaddressable by its key:
#: its id is null or empty, or an earlier row holds its id (that row is the one processed)
_UNADDRESSABLE = re.compile(r"^manifest row \d+: (duplicate \S+ |\S+_id is (null|empty)$)")
#: a null in a key column whose other values still name one row (a video's error row has a null
#: frame_index): distinct from every real value in the composite key strings
_NULL = "\x00"
_SEP = "\x1f"

#: rows read from a staged file at a time
_BATCH_ROWS = 65536


@dataclass(frozen=True)
class TableKey:
    """How a job's rows are keyed in its table.

    Attributes:
        row: one row per value of these columns (checked before anything is written).
        replace: a prefix of ``row``; tonight's rows replace every stored row with the same values
            of these columns. A video's frames and a query's hits are replaced as a whole, so a
            video whose frames changed, or a query with fewer hits, leaves nothing stale.
    """

    row: tuple[str, ...]
    replace: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.replace or self.row[: len(self.replace)] != self.replace:
            raise ValueError(f"replace key {self.replace} must be a non-empty prefix of {self.row}")


_IMAGE = TableKey(("image_id",), ("image_id",))

#: each job's key (the columns of schemas/images.py, schemas/videos.py and
#: operators/index/search_stage.py's hits). A video's ``query_index`` rather than its text: a video
#: may list the same query twice.
JOB_KEYS: dict[str, TableKey] = {
    "segment": _IMAGE,
    "matting": _IMAGE,
    "reid-embed": _IMAGE,
    "video": TableKey(("video_id", "query_index", "frame_index"), ("video_id",)),
    "reid-search": TableKey(("query_id", "rank"), ("query_id",)),
}


def as_key(key: TableKey | Sequence[str]) -> TableKey:
    """``key``, or the key whose row and replace columns are both ``key``."""
    return key if isinstance(key, TableKey) else TableKey(tuple(key), tuple(key))


#: a run's rows: its staged Parquet files (URIs) or a table
Data: TypeAlias = Sequence[str] | pa.Table


def batches(
    data: Data, storage: Storage | None, columns: Sequence[str] | None = None
) -> Iterator[pa.RecordBatch]:
    """The run's rows, streamed: a table's batches, or each staged file's (``columns`` only)."""
    if isinstance(data, pa.Table):
        yield from (
            data.select([c for c in columns if c in data.column_names]) if columns else data
        ).to_batches()
        return
    storage = storage or Storage()
    for uri in data:
        fs, path = storage.arrow_fs(uri)
        with fs.open_input_file(path) as f:
            pfile = pq.ParquetFile(f)
            cols = [c for c in columns if c in pfile.schema_arrow.names] if columns else None
            yield from pfile.iter_batches(batch_size=_BATCH_ROWS, columns=cols)


def addressable(batch: pa.RecordBatch | pa.Table, key: TableKey) -> pa.Array:
    """True for the rows their key addresses (not those of :data:`_UNADDRESSABLE`, nor a null
    first key column): the others stay in the run's Parquet results only."""
    ok = pc.is_valid(batch.column(key.row[0]))
    if "error" in batch.schema.names:
        errors = batch.column("error").cast(pa.string())
        bad = pc.fill_null(pc.match_substring_regex(errors, _UNADDRESSABLE.pattern), False)
        ok = pc.and_(ok, pc.invert(bad))
    return ok


def composite(batch: pa.RecordBatch | pa.Table, columns: Sequence[str]) -> pa.Array:
    """One string per row naming its values of ``columns``, nulls included (see :data:`_NULL`)."""
    parts = [pc.fill_null(batch.column(c).cast(pa.string()), _NULL) for c in columns]
    if len(parts) == 1:
        return parts[0]
    return pc.binary_join_element_wise(*parts, _SEP)


@dataclass(frozen=True)
class RunKeys:
    """A run's keys, gathered (key columns only) before anything is written.

    Attributes:
        replace: the distinct replace keys (:func:`composite` strings).
        first: the first key column's value of each of ``replace`` (what the table is bucketed by).
        rows: the run's addressable rows; ``skipped``: the others.
    """

    replace: pa.Array
    first: pa.Array
    rows: int
    skipped: int


def run_keys(data: Data, storage: Storage | None, key: TableKey, table: str) -> RunKeys:
    """Gather the run's keys; :class:`IcebergError` when a key column is missing or a key comes
    twice (``table`` names the target in the message)."""
    row_keys, replace, first = [], [], []
    rows = skipped = 0
    for batch in batches(data, storage, [*key.row, "error"]):
        missing = [c for c in key.row if c not in batch.schema.names]
        if missing:
            raise IcebergError(f"the run's results have no key column {missing[0]!r}")
        kept = batch.filter(addressable(batch, key))
        rows += kept.num_rows
        skipped += batch.num_rows - kept.num_rows
        row_keys.append(composite(kept, key.row))
        replace.append(composite(kept, key.replace))
        first.append(kept.column(key.replace[0]))
    counts = pa.table({"k": pa.chunked_array(row_keys, pa.string())})
    counts = counts.group_by("k").aggregate([("k", "count")])
    dup = counts.filter(pc.greater(counts.column("k_count"), 1))
    if dup.num_rows:
        example = dup.column("k")[0].as_py().replace(_SEP, ", ").replace(_NULL, "null")
        raise IcebergError(
            f"Iceberg table {table}: {dup.num_rows} key(s) of ({', '.join(key.row)}) come more "
            f"than once in the run, e.g. ({example}); a table holds one row per key"
        )
    # the first column's value is a function of the replace key: distinct pairs are distinct keys
    if not first:
        return RunKeys(pa.array([], pa.string()), pa.array([], pa.string()), rows, skipped)
    pairs = pa.table({"k": pa.chunked_array(replace, pa.string()), "f": pa.chunked_array(first)})
    distinct = pairs.group_by(["k", "f"]).aggregate([])
    return RunKeys(
        distinct.column("k").combine_chunks(), distinct.column("f").combine_chunks(), rows, skipped
    )
