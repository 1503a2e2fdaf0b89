"""One run's rows into its Iceberg table: a copy-on-write upsert committed as ONE snapshot.

pyiceberg's ``Table.upsert`` needs the run in memory and commits up to three snapshots (a delete,
an overwrite of partly deleted files, an append). Here, as in Ray's ``IcebergDatasink`` UPSERT,
the run is streamed into new data files, the existing files that hold one of its keys are
rewritten without those rows, and the deletions and additions are committed together in one
``overwrite`` snapshot (an ``append`` creates the table). Only the key columns of an existing file
are read to find its hits; a file whose rows all go is dropped unread, and the rows that stay in
the hit files of one partition are written together, so a bucket keeps about two files (what
stays, tonight's) however many nights ran.

A concurrent commit fails ours (pyiceberg validates an overwrite at serializable isolation:
another writer's new rows might hold our keys); the commit is then planned again from the new
snapshot, a bounded number of times, and the attempt's files are deleted. A snapshot records the
run id, so a rerun of a run whose commit landed (a crash just after) commits nothing.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from vbatch.operators.lakehouse.catalog import IcebergTarget, load_catalog, load_table
from vbatch.operators.lakehouse.keys import (
    Data,
    RunKeys,
    TableKey,
    addressable,
    as_key,
    batches,
    composite,
    run_keys,
)
from vbatch.operators.lakehouse.schema import check_schema, new_table
from vbatch.operators.storage import Storage

if TYPE_CHECKING:
    from pyiceberg.catalog import Catalog
    from pyiceberg.io import FileIO
    from pyiceberg.manifest import DataFile
    from pyiceberg.table import FileScanTask, Table
    from pyiceberg.table.metadata import TableMetadata

logger = logging.getLogger(__name__)

#: snapshot summary property naming the run that committed it (what makes a commit idempotent)
RUN_ID = "vbatch.run-id"
#: Arrow bytes of rows held in memory at once while data files are written: bounds a commit's
#: memory whatever the run's size (each chunk of the run adds up to BUCKETS files)
CHUNK_BYTES = 128 << 20
#: an untouched data file smaller than this is rewritten with the hit files of its partition
#: (Iceberg's own rewrite takes files under 75 % of its target size; ours are written in chunks)
SMALL_FILE_BYTES = 32 << 20
#: partitions rewritten in parallel (reads and writes of object storage; each holds a chunk)
REWRITE_THREADS = 4
#: commit attempts when other writers commit first, with exponential backoff and full jitter
COMMIT_ATTEMPTS = 5
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 20.0


class CommitConflictError(RuntimeError):
    """Other writers committed first at every one of the commit's attempts."""


@dataclass(frozen=True)
class CommitInfo:
    """What one :func:`commit` did.

    Attributes:
        snapshot_id: the snapshot holding the run (the earlier one when already committed).
        rows: the run's rows committed; ``rows_skipped``: rows no key addresses (null, empty or
            duplicate ids: they stay in the run's Parquet results); ``rows_replaced``: stored rows
            the run replaced.
        files_added, files_removed: data files (``files_added`` counts the rewritten ones).
        attempts: commit attempts (1 without conflicts); ``conflicts``: why the others failed.
        columns_added: columns the commit added to the table's schema.
        created: the commit created the table; ``already_committed``: a snapshot of this run id
            was found and nothing was written.
    """

    table: str
    snapshot_id: int
    rows: int = 0
    rows_skipped: int = 0
    rows_replaced: int = 0
    files_added: int = 0
    files_removed: int = 0
    attempts: int = 1
    conflicts: tuple[str, ...] = ()
    columns_added: tuple[str, ...] = ()
    created: bool = False
    already_committed: bool = False
    seconds: float = 0.0


# -- writing data files ------------------------------------------------------------------------------
def _write_schema(metadata: TableMetadata) -> pa.Schema:
    from pyiceberg.io.pyarrow import schema_to_pyarrow

    return schema_to_pyarrow(metadata.schema(), include_field_ids=False)


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with ``schema``'s columns, order and types (nulls for the columns it lacks)."""
    columns = [
        table.column(f.name).cast(f.type)
        if f.name in table.column_names
        else pa.nulls(table.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


class _Writer:
    """Writes rows as data files of one table version, CHUNK_BYTES of rows at a time."""

    def __init__(
        self,
        metadata: TableMetadata,
        io: FileIO,
        write_uuid: uuid.UUID,
        counter: itertools.count[int],
    ) -> None:
        self.metadata, self.io, self.uuid, self.counter = metadata, io, write_uuid, counter
        self.schema = _write_schema(metadata)
        self.files: list[DataFile] = []
        self._pending: list[pa.Table] = []
        self._bytes = 0

    def add(self, rows: pa.Table) -> None:
        if rows.num_rows:
            self._pending.append(_conform(rows, self.schema))
            self._bytes += self._pending[-1].nbytes
        if self._bytes >= CHUNK_BYTES:
            self.flush()

    def flush(self) -> list[DataFile]:
        # pyiceberg's writer (Ray's IcebergDatasink uses it too): splits by partition, writes
        # Parquet with the table's field ids and returns the files' metrics
        from pyiceberg.io.pyarrow import _dataframe_to_data_files

        if self._pending:
            table = pa.concat_tables(self._pending)
            self._pending, self._bytes = [], 0
            self.files += _dataframe_to_data_files(
                self.metadata, table, self.io, self.uuid, self.counter
            )
        return self.files


def _write_run(
    data: Data, storage: Storage | None, key: TableKey, metadata: TableMetadata, io: FileIO
) -> list[DataFile]:
    """The run's addressable rows as new data files."""
    writer = _Writer(metadata, io, uuid.uuid4(), itertools.count())
    for batch in batches(data, storage):
        writer.add(pa.Table.from_batches([batch]).filter(addressable(batch, key)))
    return writer.flush()


# -- rewriting the files that hold the run's keys ----------------------------------------------------
@dataclass
class _Rewrite:
    old: list[DataFile] = field(default_factory=list)  # the files dropped
    new: list[DataFile] = field(default_factory=list)  # their rows that stay
    replaced: int = 0


def _bucket_groups(run: RunKeys, metadata: TableMetadata, column: str) -> dict[int, Any]:
    """Per partition spec with a bucket field on ``column``: (the field's position, the run's
    replace keys by bucket), so that a file is checked against its own bucket's keys only."""
    from pyiceberg.transforms import BucketTransform

    source = metadata.schema().find_field(column)
    by_n: dict[int, dict[int, pa.Array]] = {}
    groups: dict[int, Any] = {}
    for spec_id, spec in metadata.specs().items():
        for pos, pf in enumerate(spec.fields):
            if pf.source_id != source.field_id or not isinstance(pf.transform, BucketTransform):
                continue
            n = pf.transform.num_buckets
            if n not in by_n:
                buckets = BucketTransform(n).pyarrow_transform(source.field_type)(run.first)
                grouped = pa.table({"b": buckets, "k": run.replace}).group_by("b")
                grouped = grouped.aggregate([("k", "list")])
                by_n[n] = {
                    b: keys.values
                    for b, keys in zip(
                        grouped.column("b").to_pylist(), grouped.column("k_list"), strict=True
                    )
                }
            groups[spec_id] = (pos, by_n[n])
            break
    return groups


def _rewrite_partition(
    tasks: list[FileScanTask],
    keys: pa.Array,
    key: TableKey,
    metadata: TableMetadata,
    io: FileIO,
    write_uuid: uuid.UUID,
    counter: itertools.count[int],
) -> _Rewrite:
    """Drop the rows of ``keys`` from one partition's files.

    A file's key columns are read first; its whole rows only when some of them stay. When any
    file of the partition is hit, its small files are folded in too (a compaction of what is
    rewritten anyway), and all that stays is written together: a partition keeps about two files,
    what stays and tonight's, whichever keys the nights touch.
    """
    from pyiceberg.expressions import AlwaysTrue
    from pyiceberg.io.pyarrow import ArrowScan

    schema = metadata.schema()
    key_schema = schema.select(*key.replace)
    hits: list[tuple[FileScanTask, pa.Array | None]] = []  # per file: rows that go, or None: all
    for task in tasks:
        stored = ArrowScan(metadata, io, key_schema, AlwaysTrue()).to_table([task])
        hit = pc.is_in(composite(stored, key.replace), value_set=keys)
        hits.append((task, None if pc.all(hit).as_py() else hit))
    out = _Rewrite(
        replaced=sum(t.file.record_count if h is None else pc.sum(h).as_py() or 0 for t, h in hits)
    )
    if out.replaced == 0:
        return out
    writer = _Writer(metadata, io, write_uuid, counter)
    for task, hit in hits:
        if (
            hit is not None
            and not pc.any(hit).as_py()
            and task.file.file_size_in_bytes >= SMALL_FILE_BYTES
        ):
            continue  # untouched and big enough: stays as it is
        out.old.append(task.file)
        if hit is None:
            continue  # every row goes: dropped unread
        for batch in ArrowScan(metadata, io, schema, AlwaysTrue()).to_record_batches([task]):
            stay = pc.invert(pc.is_in(composite(batch, key.replace), value_set=keys))
            writer.add(pa.Table.from_batches([batch]).filter(stay))
    out.new = writer.flush()
    return out


def _rewrites(
    table: Table, run: RunKeys, key: TableKey, metadata: TableMetadata, io: FileIO
) -> list[_Rewrite]:
    """Rewrite the current snapshot's files that hold one of the run's replace keys."""
    from pyiceberg.expressions import And, GreaterThanOrEqual, LessThanOrEqual, Reference

    if table.current_snapshot() is None or len(run.replace) == 0:
        return []
    column = key.replace[0]
    bounds = pc.min_max(run.first)
    # a range over the run's first key values: the scan skips files by their column bounds
    coarse = And(
        GreaterThanOrEqual(term=Reference(column), value=bounds["min"].as_py()),
        LessThanOrEqual(term=Reference(column), value=bounds["max"].as_py()),
    )
    groups = _bucket_groups(run, metadata, column)
    partitions: dict[Any, list[FileScanTask]] = defaultdict(list)
    keys_of: dict[Any, pa.Array] = {}
    for task in table.scan(row_filter=coarse).plan_files():
        spec_id = task.file.spec_id
        where = (spec_id, task.file.partition)
        if spec_id in groups:
            pos, by_bucket = groups[spec_id]
            keys = by_bucket.get(task.file.partition[pos])
            if keys is None:
                continue  # none of the run's keys falls in this bucket
        else:
            keys = run.replace
        partitions[where].append(task)
        keys_of[where] = keys
    write_uuid, counter = uuid.uuid4(), itertools.count()
    with ThreadPoolExecutor(REWRITE_THREADS) as pool:
        jobs = [
            pool.submit(
                _rewrite_partition, tasks, keys_of[where], key, metadata, io, write_uuid, counter
            )
            for where, tasks in partitions.items()
        ]
        return [j.result() for j in jobs]


# -- committing --------------------------------------------------------------------------------------
def _committed(table: Table, run_id: str) -> int | None:
    for snap in table.snapshots():
        if snap.summary is not None and snap.summary.get(RUN_ID) == run_id:
            return snap.snapshot_id
    return None


def _delete_quietly(io: FileIO | None, files: Iterable[DataFile]) -> None:
    """Remove the data files of an attempt whose commit did not land."""
    for f in files:
        try:
            assert io is not None
            io.delete(f.file_path)
        except Exception as e:  # best effort: an orphan costs storage, never correctness
            logger.warning("could not delete uncommitted data file %s: %s", f.file_path, e)


@dataclass
class _Attempt:
    """The data files one attempt wrote: deleted when it fails before its commit reaches the
    catalog, or the catalog refuses it; kept when the commit's outcome is unknown."""

    io: FileIO | None = None
    written: list[DataFile] = field(default_factory=list)
    committing: bool = False


def _create(
    catalog: Catalog,
    target: IcebergTarget,
    data: Data,
    storage: Storage | None,
    key: TableKey,
    schema: pa.Schema,
    run: RunKeys,
    summary: dict[str, str],
    attempt: _Attempt,
) -> CommitInfo:
    fresh, spec, order, properties = new_table(schema, key)
    catalog.create_namespace_if_not_exists(target.namespace)
    # created and filled in one catalog commit: a run that dies leaves no empty table behind
    txn = catalog.create_table_transaction(
        target.table, schema=fresh, partition_spec=spec, sort_order=order, properties=properties
    )
    attempt.io = txn._table.io
    new = _write_run(data, storage, key, txn.table_metadata, attempt.io)
    attempt.written += new
    with txn.update_snapshot(snapshot_properties=summary).fast_append() as snap:
        for f in new:
            snap.append_data_file(f)
    attempt.committing = True
    sid = txn.commit_transaction().metadata.current_snapshot_id
    assert sid is not None
    return CommitInfo(target.table, sid, run.rows, run.skipped, 0, len(new), created=True)


def _upsert(
    table: Table,
    target: IcebergTarget,
    data: Data,
    storage: Storage | None,
    key: TableKey,
    schema: pa.Schema,
    run: RunKeys,
    summary: dict[str, str],
    attempt: _Attempt,
) -> CommitInfo:
    evolution = check_schema(target, table.schema(), table.properties, schema, key)
    txn = table.transaction()
    if evolution:
        evolution.apply(txn)  # committed with the snapshot, or not at all
    metadata, attempt.io = txn.table_metadata, table.io
    new = _write_run(data, storage, key, metadata, table.io)
    attempt.written += new
    rewrites = _rewrites(table, run, key, metadata, table.io)
    for r in rewrites:
        attempt.written += r.new
    replaced = sum(r.replaced for r in rewrites)
    summary = {**summary, "vbatch.rows-replaced": str(replaced)}
    # ONE snapshot: the dropped files, what stays of them and the run's rows. Serializable
    # validation: a snapshot another writer committed since this plan fails it
    with txn.update_snapshot(snapshot_properties=summary).overwrite() as snap:
        for r in rewrites:
            for f in r.old:
                snap.delete_data_file(f)
            for f in r.new:
                snap.append_data_file(f)
        for f in new:
            snap.append_data_file(f)
    attempt.committing = True
    sid = txn.commit_transaction().metadata.current_snapshot_id
    assert sid is not None
    return CommitInfo(
        target.table,
        sid,
        run.rows,
        run.skipped,
        replaced,
        files_added=len(new) + sum(len(r.new) for r in rewrites),
        files_removed=sum(len(r.old) for r in rewrites),
        columns_added=tuple(name for name, _ in evolution.add),
    )


def commit(
    target: IcebergTarget,
    data: Data,
    *,
    key: TableKey | Sequence[str],
    schema: pa.Schema,
    run_id: str,
    properties: Mapping[str, Any] | None = None,
    storage: Storage | None = None,
    attempts: int = COMMIT_ATTEMPTS,
) -> CommitInfo:
    """Upsert a run's rows into ``target`` as one snapshot; the first commit creates the table.

    The run's rows replace the stored rows with the same ``key.replace`` values; other stored rows
    stay. A new column is added to the table (optional); a change Iceberg does not allow is
    refused before anything is written. Rows whose id is null, empty or a duplicate (the
    manifest's key errors) are not committed. A ``run_id`` that a snapshot already holds (a
    rerun after a crash past the commit) commits nothing.

    Args:
        data: the run's staged Parquet files (URIs read through ``storage``), or a table.
        key: the job's key (:data:`~vbatch.operators.lakehouse.keys.JOB_KEYS`) or its columns.
        schema: the run's results schema: the new table's; every batch is conformed to the table.
        run_id: recorded as the snapshot's ``vbatch.run-id`` summary property.
        properties: more snapshot summary properties (model version, vbatch version, counts);
            values become strings.
        attempts: commit attempts while other writers commit first.

    Returns:
        What was committed.

    Raises:
        IcebergError: the catalog, a key or the schema cannot take the run (nothing written).
        CommitConflictError: other writers committed first at every attempt.
    """
    from pyiceberg.exceptions import (
        CommitFailedException,
        TableAlreadyExistsError,
        ValidationException,
    )

    start = time.monotonic()
    key = as_key(key)
    catalog = load_catalog(target.catalog)
    run = run_keys(data, storage, key, target.table)
    summary = {
        RUN_ID: run_id,
        **{k: str(v) for k, v in (properties or {}).items()},
        "vbatch.rows": str(run.rows),
        "vbatch.rows-skipped": str(run.skipped),
    }
    conflicts: list[str] = []
    for number in range(1, attempts + 1):
        table = load_table(catalog, target)
        if table is not None and (sid := _committed(table, run_id)) is not None:
            logger.info(
                "Iceberg table %s already holds run %s: snapshot %d", target.table, run_id, sid
            )
            return CommitInfo(
                target.table,
                sid,
                attempts=number,
                conflicts=tuple(conflicts),
                already_committed=True,
                seconds=time.monotonic() - start,
            )
        attempt = _Attempt()
        try:
            if table is None:
                info = _create(catalog, target, data, storage, key, schema, run, summary, attempt)
            else:
                info = _upsert(table, target, data, storage, key, schema, run, summary, attempt)
        except (CommitFailedException, ValidationException, TableAlreadyExistsError) as e:
            # each guarantees that nothing of this attempt landed
            _delete_quietly(attempt.io, attempt.written)
            conflicts.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            if number == attempts:
                raise CommitConflictError(
                    f"Iceberg table {target.table}: other writers committed first at all "
                    f"{attempts} attempts ({'; '.join(conflicts)})"
                ) from e
            delay = random.uniform(0, min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**number))
            logger.warning(
                "Iceberg table %s: %s; retrying in %.1f s", target.table, conflicts[-1], delay
            )
            time.sleep(delay)
            continue
        except BaseException:
            if not attempt.committing:  # nothing can have landed: no orphan files
                _delete_quietly(attempt.io, attempt.written)
            raise
        info = replace(
            info, attempts=number, conflicts=tuple(conflicts), seconds=time.monotonic() - start
        )
        logger.info(
            "Iceberg table %s: snapshot %d, %d rows (%d replaced, %d skipped), +%d/-%d files, "
            "%d attempt(s), %.1f s",
            target.table,
            info.snapshot_id,
            info.rows,
            info.rows_replaced,
            info.rows_skipped,
            info.files_added,
            info.files_removed,
            info.attempts,
            info.seconds,
        )
        return info
    raise AssertionError("unreachable: the last attempt returns or raises")
