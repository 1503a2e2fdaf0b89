"""How every job lands its results table: staged, checked, committed by a pointer, recorded.

Object stores have no rename and no multi-object transaction, so a table is never replaced in
place. Each run writes a new *generation* and commits it with one single-object write, the way
``operators/faiss_index.py`` commits an index (and Iceberg/Delta commit a snapshot)::

    <out>/.staging/<run id>/*.parquet    Ray's output while the job runs; never read by readers
                                         (the image and video jobs name it by run key:
                                         ``jobs.resume``, ``jobs.video_resume``)
    <out>/results/<run id>/*.parquet     a generation: written once, never modified
    <out>/results/<run id>/_SUCCESS      JSON: the generation's files and rows (Hadoop's S3A
                                         committers write the same kind of manifest)
    <out>/_LATEST                        ``results/<run id>``, the committed generation: the
                                         commit point
    <out>/run.json                       the run's summary (``jobs.summary``)
    <out>/_SUCCESS                       the same summary, written last; removed first when a
                                         rerun starts to publish (what Airflow sensors watch)

Publishing, step by step (each step is a fault-injection point, see :func:`fault_point`):
remove ``<out>/_SUCCESS`` → move the staged files to ``results/<run id>/`` and write its
``_SUCCESS`` → write ``_LATEST`` (one PUT / ``os.replace``) → delete the other generations
and every ``.staging/`` folder → write ``run.json`` → write ``<out>/_SUCCESS``. A crash before the
pointer leaves the previous generation committed; after it, the new one. Readers resolve the table
with :func:`results_files`, the one listing rule for every reader of job outputs.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import ray

from vbatch.operators.storage import Storage, join
from vbatch.operators.tables import (
    POINTER,
    PRODUCTS,
    RESULTS,
    STAGING,
    SUCCESS,
    read_text,
    results_files,
)

logger = logging.getLogger(__name__)

RUN_RECORD = "run.json"

#: ``VBATCH_FAULT=publish:<step>`` raises :class:`InjectedFault` right after that step (tests)
FAULT_ENV = "VBATCH_FAULT"
PUBLISH_STEPS = (
    "after-stage",
    "after-unmark",
    "after-copy",
    "after-pointer",
    "after-cleanup",
    "after-record",
)


class InjectedFault(RuntimeError):
    """Raised at a publish step named by ``VBATCH_FAULT`` (crash tests)."""


def fault_point(step: str) -> None:
    """Raise :class:`InjectedFault` if ``VBATCH_FAULT`` names ``publish:<step>``.

    Raising here leaves the outputs exactly as a killed driver would: publishing runs no cleanup
    on errors.
    """
    if os.environ.get(FAULT_ENV) == f"publish:{step}":
        raise InjectedFault(f"injected fault at publish:{step} ({FAULT_ENV})")


def read_table(uri: str, storage: Storage, columns: list[str] | None = None) -> pa.Table:
    """The table at ``uri`` (see :func:`results_files`), optionally only ``columns``."""
    files = results_files(uri, storage)
    if not files:
        raise FileNotFoundError(f"no Parquet files under {uri}")
    return read_files(files, storage, columns)


def read_files(files: list[str], storage: Storage, columns: list[str] | None = None) -> pa.Table:
    """One table of Parquet ``files`` (all on the same store)."""
    fs, _ = storage.arrow_fs(files[0])
    return pads.dataset(
        [storage.arrow_fs(f)[1] for f in files], filesystem=fs, format="parquet"
    ).to_table(columns=columns)


# -- writing ---------------------------------------------------------------------------------------
def stage(ds: ray.data.Dataset, out: str, storage: Storage, run_id: str) -> list[str]:
    """Execute ``ds`` into ``<out>/.staging/<run_id>/``; returns every Parquet file staged there
    (with those of an earlier, unfinished attempt with the same ``run_id``: ``jobs.resume``)."""
    staging = join(out, STAGING, run_id)
    fs, staging_path = storage.arrow_fs(staging)
    storage.makedirs(staging)
    ds.write_parquet(staging_path, filesystem=fs)
    return staged_files(out, storage, run_id)


#: the column that routes a row of a shared pipeline to its job (``vbatch backfill``)
PARTITION = "_vb_partition"


def stage_partitions(
    ds: ray.data.Dataset, targets: dict[int, tuple[str, str]], storage: Storage
) -> dict[int, list[str]]:
    """Execute ``ds``, whose rows carry their job's number in :data:`PARTITION`, into each job's
    staging folder ``<out>/.staging/<key>/`` (``targets``: number → (out, key)): one Parquet file
    per block and job, each written whole (one PUT on S3). Returns each job's staged files, with
    those of an earlier, unfinished attempt (``jobs.resume``)."""
    for out, key in targets.values():
        storage.makedirs(join(out, STAGING, key))
    written = ds.map_batches(
        _write_staged,  # type: ignore[arg-type]
        fn_kwargs={"targets": targets, "storage": storage},
        batch_format="pyarrow",
        batch_size=None,
        udf_modifying_row_count=True,
    )
    for _ in written.iter_batches(batch_size=None):  # runs the pipeline; the counts are small
        pass
    return {i: staged_files(out, storage, key) for i, (out, key) in targets.items()}


def _write_staged(
    batch: pa.Table, *, targets: dict[int, tuple[str, str]], storage: Storage
) -> pa.Table:
    import io

    import numpy as np
    import pyarrow.parquet as pq

    numbers = batch.column(PARTITION).to_numpy()
    counts = []
    for number in np.unique(numbers):
        rows = batch.filter(pa.array(numbers == number)).drop_columns([PARTITION])
        out, key = targets[int(number)]
        buf = io.BytesIO()
        pq.write_table(rows, buf)
        storage.write_bytes(join(out, STAGING, key, staged_name(rows)), buf.getvalue())
        counts.append((int(number), rows.num_rows))
    return pa.table(
        {
            "partition": pa.array([c[0] for c in counts], pa.int32()),
            "rows": pa.array([c[1] for c in counts], pa.int64()),
        }
    )


def staged_name(rows: pa.Table) -> str:
    """A staged file's name from its rows (their ids and errors, sorted): a task that Ray retries
    after its worker died writes the same rows under the same name, replacing its first file
    instead of adding a second copy of the rows."""
    import hashlib

    import pyarrow.compute as pc

    keys = pc.binary_join_element_wise(
        pc.cast(rows.column("image_id"), pa.string()).fill_null("\x00"),
        pc.cast(rows.column("error"), pa.string()).fill_null(""),
        "\x1f",
    )
    digest = hashlib.sha256("\x1e".join(sorted(keys.to_pylist())).encode()).hexdigest()
    return f"part-{digest[:32]}.parquet"


def staged_files(out: str, storage: Storage, run_id: str) -> list[str]:
    """The Parquet files staged for ``run_id``, listed from the store rather than from a cached
    listing (Ray's workers wrote them from other processes)."""
    staging = join(out, STAGING, run_id)
    fs, path = storage.fs(staging)
    fs.invalidate_cache(path)
    files = storage.list_files(staging, suffix=".parquet")
    fault_point("after-stage")
    return files


def publish(
    out: str,
    storage: Storage,
    run_id: str,
    staged: list[str],
    rows: int,
    staging_name: str | None = None,
    record: dict[str, Any] | None = None,
    product_dirs: list[str] | None = None,
    clean_products: bool = True,
) -> str:
    """Commit the staged files as the generation ``run_id`` of ``<out>/results``.

    Args:
        out: the job's ``--out``.
        staged: the files :func:`stage` wrote.
        rows: the table's row count, recorded in the generation's ``_SUCCESS``.
        staging_name: the staging folder under ``<out>/.staging/`` (default ``run_id``; the image
            jobs stage under their run key so that a rerun can resume, see ``jobs.resume``).
        record: the commit record: what the generation was computed with (model identity,
            the options that decide results, the run key). Written into the generation's
            ``_SUCCESS`` before the pointer moves, so that whoever follows the pointer
            (``--reuse``, a backfill's ledger) reads the facts of that very generation.
        product_dirs: the product folders (relative to ``out``) the generation's rows reference;
            after the commit every other product folder is deleted (unless ``clean_products`` is
            false: an Iceberg table's older snapshots may name them).

    Returns:
        The generation's folder, ``<out>/results/<run_id>``.
    """
    staging = join(out, STAGING, staging_name or run_id)
    generation = join(out, RESULTS, run_id)
    # the marker says "the last run here finished": gone while this one publishes
    storage.delete(join(out, SUCCESS))
    fault_point("after-unmark")
    names = [posixpath.relpath(f.split("://", 1)[-1], staging.split("://", 1)[-1]) for f in staged]
    if staged:
        # a rename locally; server-side copies on S3. Not visible to pointer readers until the
        # pointer names it.
        storage.move(staging, generation)
    else:
        storage.makedirs(generation)
    marker = {
        **(record or {}),
        "run_id": run_id,
        "files": sorted(names),
        "rows": rows,
        "product_dirs": sorted(product_dirs or []),
    }
    storage.write_bytes(join(generation, SUCCESS), json.dumps(marker, indent=1).encode())
    fault_point("after-copy")
    # the commit: one object, replaced whole
    storage.write_bytes(join(out, POINTER), f"{RESULTS}/{run_id}\n".encode())
    fault_point("after-pointer")
    try:
        kept = set(product_dirs or []) if clean_products else None
        remove_stale(out, storage, run_id, kept)
    except InjectedFault:
        raise
    except Exception as e:  # published: a later run's cleanup removes what is left
        logger.warning("%s: the new generation is committed, cleaning up failed: %s", out, e)
    fault_point("after-cleanup")
    return generation


#: product folders of the layout before products lived under ``products/<run id>/``
LEGACY_PRODUCT_DIRS = ("masks", "mattes", "cutouts", "composites", "frames")


def product_dirs(table: pa.Table | None, out: str, columns: tuple[str, ...]) -> list[str]:
    """The product folders (relative to ``out``: ``products/<run id>`` or a legacy folder) that
    the rows of ``table`` reference in its URI ``columns``."""
    import pyarrow.compute as pc

    if table is None:
        return []
    prefix = out.rstrip("/") + "/"
    found: set[str] = set()
    for name in columns:
        if name not in table.column_names:
            continue
        uris = pc.unique(table.column(name).drop_null())
        inside = uris.filter(pc.starts_with(uris, prefix))
        for rel in pc.utf8_slice_codeunits(inside, len(prefix)).to_pylist():
            parts = rel.split("/")
            found.add("/".join(parts[:2]) if parts[0] == PRODUCTS else parts[0])
    return sorted(found)


def remove_stale(out: str, storage: Storage, keep: str, products: set[str] | None = None) -> None:
    """After the pointer moved to generation ``keep``: delete every other generation (and files
    of the layout before generations), every staging folder, and every product folder the
    committed rows do not reference (``products``; ``None``: leave the products alone).

    The generation ``_LATEST`` names is never deleted, whichever it is: should another run have
    committed after this one (runs take a lease; this is the last line of defence), its table
    stays readable.
    """
    committed = read_text(join(out, POINTER), storage) or ""
    spared = {keep, posixpath.basename(committed.rstrip("/"))}
    results = join(out, RESULTS)
    fs, path = storage.fs(results)
    fs.invalidate_cache()
    if fs.exists(path):
        for entry in fs.ls(path, detail=False):
            name = posixpath.basename(entry.rstrip("/"))
            if name not in spared:
                storage.delete(join(results, name), recursive=True)
    storage.delete(join(out, STAGING), recursive=True)
    if products is None or posixpath.basename(committed.rstrip("/")) != keep:
        return
    candidates = [f"{PRODUCTS}/{name}" for name in _children(storage, join(out, PRODUCTS))]
    candidates += [d for d in LEGACY_PRODUCT_DIRS if storage.exists(join(out, d))]
    for rel in candidates:
        if rel not in products:
            storage.delete(join(out, rel), recursive=True)


def _children(storage: Storage, uri: str) -> list[str]:
    """The names directly under folder ``uri`` (none when it does not exist)."""
    fs, path = storage.fs(uri)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return []
    return sorted(posixpath.basename(e.rstrip("/")) for e in fs.ls(path, detail=False))


def write_run_record(out: str, storage: Storage, record: dict[str, Any]) -> None:
    """``<out>/run.json``, then ``<out>/_SUCCESS`` (the same JSON), the last object a run writes."""
    data = json.dumps(record, indent=2, default=str).encode()
    storage.write_bytes(join(out, RUN_RECORD), data)
    fault_point("after-record")
    storage.write_bytes(join(out, SUCCESS), data)


def report_details(
    results_uri: str,
    model_version: str | None,
    sample_errors: list[tuple[str | None, str]],
    error_rows: int,
    extra: tuple[str, ...] = (),
) -> list[str]:
    """The lines a job summary prints under its headline: where the results are, ``extra``, the
    model version and a few of the error rows (with a count of those not shown)."""
    lines = [f"results: {results_uri}", *extra]
    if model_version:
        lines.append(f"model_version: {model_version}")
    lines += [f"  error {key!r}: {err}" for key, err in sample_errors]
    if error_rows > len(sample_errors):
        more = error_rows - len(sample_errors)
        lines.append(f"  … {more} more error rows (see the results table)")
    return lines
