"""Resume an image job after a crash: the rerun of the same command finishes only what is missing.

A run stages its results under ``<out>/.staging/<run key>/`` (see :mod:`vbatch.jobs.publish`),
where the key is a hash of what decides the results (:func:`run_key`: the manifest files as listed,
the model's content identity, the options whose role is to decide results, ``jobs.config``). A driver killed mid-run leaves that folder
with the Parquet files Ray had written so far; each is written in one go (a single PUT on S3; a
file cut short locally has no footer and is dropped here), and the write stage writes a row's
products before its result row, so a staged row means its products exist. The rerun reads the row
keys of those files (:func:`previous_attempt`), drops those rows from the manifest dataset before
the fetch stage (:func:`drop_done`), writes the rest into the same folder, and publishes old and
new files together: every manifest row exactly once.

Why not Ray Data's ``ray.data.checkpoint.CheckpointConfig`` (beta in Ray 2.60): it filters rows
in a ``Read`` operator only (our dataset comes from ``from_arrow_refs`` after the manifest pass, so
Ray disables it with a warning), it needs an id unique over all rows (manifests can hold null and
duplicate ids, which must come out as error rows), it keeps its own checkpoint files next to the
output (a second thing to publish and clean, and on local disks only a network file system will
do), and it knows nothing of our generations: the staged Parquet files are the record already.

Rows with infrastructure errors are redone: a staged file holding one is deleted before the rerun
(its other rows are redone too; a file is one model batch). Reading a staged file is a storage read
like any other, retried through outages and throttling; only a file that was read whole and is not
valid Parquet (cut short) is deleted. When the store stays unreachable the rerun stops and keeps
every file: going on without them would redo their rows and publish them twice.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vbatch.operators.manifest import ERROR, ROW, id_hashes, sorted_lookup
from vbatch.operators.storage import Storage, StorageUnavailableError, join
from vbatch.operators.tables import STAGING
from vbatch.schemas.errors import INFRASTRUCTURE
from vbatch.schemas.images import key_error_row

logger = logging.getLogger(__name__)


def file_fingerprints(files: list[str], storage: Storage) -> list[list[Any]]:
    """``[uri, size, ETag or modification time]`` per file, from one listing call each
    (S3: ``ETag``; local: ``mtime``)."""
    out: list[list[Any]] = []
    for uri in files:
        info = storage.info(uri)  # retried, like every storage read
        stamp = info.get("ETag") or info.get("LastModified") or info.get("mtime")
        out.append([uri, int(info.get("size") or 0), str(stamp)])
    return out


def run_key(config: dict[str, Any], manifest: list[list[Any]], model: list[Any]) -> str:
    """The staging folder name of a run: ``run-<16 hex>`` over the configuration fields that
    decide results (``config``: ``jobs.config.key_fields``), the manifest's fingerprints and the
    model's (its content identity, ``operators.reuse.model_identity``)."""
    decided = dict(sorted(config.items()))
    blob = json.dumps([decided, manifest, model], sort_keys=True, default=str).encode()
    return "run-" + hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class PreviousAttempt:
    """What an unfinished run with the same key staged: its files and the keys of their rows."""

    files: list[str] = field(default_factory=list)
    #: sorted uint64 hashes (``operators.manifest.id_hashes``) of the ids of rows with a usable key
    done_ids: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))
    #: sorted manifest rows of key-error rows (null, empty or duplicate id)
    done_rows: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    #: files dropped: unreadable (cut short) or holding infrastructure errors
    dropped: int = 0

    @property
    def rows(self) -> int:
        return len(self.done_ids) + len(self.done_rows)


def staged_tables(
    out: str,
    storage: Storage,
    key: str,
    columns: list[str],
    redo: Callable[[pa.Table], bool],
) -> tuple[list[tuple[str, pa.Table]], int]:
    """The staged files of an unfinished run ``key`` under ``out`` that can count, read.

    A file that cannot count is deleted: one cut short (read whole, but not valid Parquet: the
    writer died mid-file, local disks only) and one for which ``redo`` says its rows must be redone
    (infrastructure errors). A file that could not be read is never deleted: the storage layer
    retries the read, and when the store stays unreachable the error ends the run with every file
    kept.

    Returns:
        ``([(uri, table of columns)], files deleted)``.

    Raises:
        StorageUnavailableError: a staged file could not be read within the retry budget.
    """
    staging = join(out, STAGING, key)
    fs, path = storage.fs(staging)
    fs.invalidate_cache(path)
    kept: list[tuple[str, pa.Table]] = []
    dropped = 0
    for uri in storage.list_files(staging, suffix=".parquet"):
        afs, apath = storage.arrow_fs(uri)  # reads retried (operators.s3.RetryingFSSpecHandler)
        try:
            table = pq.read_table(apath, filesystem=afs, columns=columns)
        except pa.ArrowInvalid as e:  # read whole, no valid footer: the writer died mid-file
            logger.warning("resume: dropping the incomplete staged file %s (%s)", uri, e)
            storage.delete(uri)
            dropped += 1
            continue
        except FileNotFoundError:  # gone since the listing: nothing of it to count or delete
            logger.warning("resume: the staged file %s disappeared; its rows are redone", uri)
            continue
        except StorageUnavailableError:
            logger.error("resume: cannot read the staged file %s; every staged file is kept", uri)
            raise
        if redo(table):
            logger.info("resume: redoing the rows of %s (infrastructure errors)", uri)
            storage.delete(uri)
            dropped += 1
            continue
        kept.append((uri, table))
    return kept, dropped


def _key_rows(table: pa.Table) -> tuple[list[int | None], np.ndarray]:
    """The manifest row of each key-error row (``None`` elsewhere), and which rows are those."""
    rows = [key_error_row(m) for m in table.column("error").to_pylist()]
    is_key_error = pc.equal(table.column("error_class").fill_null(""), "manifest").to_numpy(
        zero_copy_only=False
    )
    return rows, is_key_error


def _redo_image_file(table: pa.Table) -> bool:
    """Infrastructure error rows, or a key-error row whose manifest row cannot be read back."""
    rows, is_key_error = _key_rows(table)
    unparsed = any(k and r is None for k, r in zip(is_key_error, rows, strict=True))
    return bool(pc.any(pc.equal(table.column("error_class"), INFRASTRUCTURE)).as_py()) or unparsed


def previous_attempt(out: str, storage: Storage, key: str) -> PreviousAttempt:
    """Read the staged files of an unfinished run ``key`` under ``out``; delete those that cannot
    count (see :func:`staged_tables`).

    Returns:
        The files kept and their rows' keys (empty when there was no such run).
    """
    kept, dropped = staged_tables(
        out, storage, key, ["image_id", "error", "error_class"], _redo_image_file
    )
    found = PreviousAttempt(dropped=dropped)
    ids: list[np.ndarray] = []
    rows: list[int] = []
    for uri, table in kept:
        key_rows, is_key_error = _key_rows(table)
        found.files.append(uri)
        rows += [r for r in key_rows if r is not None]
        ids.append(id_hashes(table.column("image_id").filter(pa.array(~is_key_error))))
    found.done_ids = np.sort(np.concatenate(ids)) if ids else found.done_ids
    found.done_rows = np.sort(np.array(rows, np.int64))
    if found.files or found.dropped:
        logger.info(
            "resume: %d rows in %d staged files of an unfinished run (%s); %d files dropped",
            found.rows,
            len(found.files),
            join(out, STAGING, key),
            found.dropped,
        )
    return found


def row_keys(table: pa.Table) -> list[str]:
    """The key of each result row of an image job: ``id:<image_id>``, or ``row:<n>`` for the row
    of an unusable key (null, empty or duplicate id) that names manifest row n."""
    keys, is_key_error = _key_rows(table)
    ids = table.column("image_id").to_pylist()
    return [
        f"row:{k}" if bad and k is not None else f"id:{i}"
        for k, bad, i in zip(keys, is_key_error, ids, strict=True)
    ]


def dedupe_staged(files: list[str], storage: Storage) -> tuple[list[str], int]:
    """The staged files of an image job with no row twice.

    Ray retries a task whose worker died (an OOM kill, a lost node); a write task that had
    written its file before dying writes its rows again, under another name when the retried
    batch is cut differently. Publishing would then fail its accounting on every rerun. Here a
    row whose key (:func:`row_keys`) an earlier file (in name order) already holds is dropped:
    its file is rewritten without it (one atomic write), or deleted when nothing is left.

    Returns:
        (the files to publish, the rows dropped).
    """
    seen: set[str] = set()
    kept: list[str] = []
    dropped = 0
    for uri in sorted(files):
        afs, path = storage.arrow_fs(uri)
        table = pq.read_table(path, filesystem=afs)
        fresh = []
        for k in row_keys(table):
            fresh.append(k not in seen)
            seen.add(k)
        if all(fresh):
            kept.append(uri)
            continue
        dropped += fresh.count(False)
        if not any(fresh):
            storage.delete(uri)
            continue
        buf = io.BytesIO()
        pq.write_table(table.filter(pa.array(fresh)), buf)
        storage.write_bytes(uri, buf.getvalue())
        kept.append(uri)
    if dropped:
        logger.warning("staging held %d rows twice (a retried task): dropped the copies", dropped)
    return kept, dropped


def drop_done(batch: pa.Table, done_ids: np.ndarray, done_rows: np.ndarray) -> pa.Table:
    """Ray Data stage on the annotated manifest: the rows an earlier attempt has not staged.

    Args:
        batch: manifest rows with ``image_id``, ``_vb_row`` and ``_vb_error``.
        done_ids, done_rows: see :class:`PreviousAttempt` (sorted).

    Returns:
        ``batch`` without the rows already staged: a row with a usable key whose id is done, or a
        key-error row whose manifest row is done.
    """
    if batch.num_rows == 0:
        return batch
    usable = batch.column(ERROR).is_null().to_numpy(zero_copy_only=False)
    done = usable & sorted_lookup(id_hashes(batch.column("image_id").combine_chunks()), done_ids)[0]
    done |= ~usable & sorted_lookup(batch.column(ROW).to_numpy(), done_rows)[0]
    return batch.filter(pa.array(~done))


#: ``VBATCH_FAULT=rows:<N>`` (tests, benchmarks): the job dies in its write stage at the first
#: batch holding manifest row N or later, leaving what Ray had staged
ROWS_FAULT = "rows:"
#: ``VBATCH_FAULT=hang:<N>``: that batch blocks instead, until the driver is killed (tests that
#: SIGKILL a real driver at a known point)
HANG_FAULT = "hang:"


def fault_row(spec: str | None) -> tuple[int, bool] | None:
    """``(N, hang)`` of a ``rows:<N>`` or ``hang:<N>`` fault spec (``VBATCH_FAULT``), else ``None``."""
    for prefix, hang in ((ROWS_FAULT, False), (HANG_FAULT, True)):
        if spec and spec.startswith(prefix):
            return int(spec[len(prefix) :]), hang
    return None


def raise_from_row(batch: pa.Table, row: int, hang: bool = False) -> pa.Table:
    """Ray Data stage before the write stage: raise (or block, ``hang``) on a batch holding
    manifest row ``row`` or later."""
    if batch.num_rows and pc.max(batch.column(ROW)).as_py() >= row:
        stop_here(f"manifest row >= {row}", f"{row}", hang)
    return batch


def stop_here(where: str, spec: str, hang: bool) -> None:
    """Block until killed (``hang``) or raise :class:`vbatch.jobs.publish.InjectedFault`: the
    fault of a ``VBATCH_FAULT=hang:<spec>`` or ``rows:<spec>`` that was reached at ``where``."""
    if hang:
        import time

        logger.warning("VBATCH_FAULT=hang:%s: blocking at %s until killed", spec, where)
        while True:
            time.sleep(60)
    from vbatch.jobs.publish import InjectedFault

    raise InjectedFault(f"injected fault at {where} (VBATCH_FAULT=rows:{spec})")
