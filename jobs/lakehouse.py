"""``--table NAMESPACE.TABLE``: a row job's results committed to an Iceberg table as well.

The table is checked before any work (:func:`check_table`: catalog reachable, the job's schema
acceptable, naming the column that is not) and written at the run's commit point
(:func:`commit_table`, called by :func:`vbatch.jobs.finish.finish` after the accounting checks
and the lease, right before the Parquet generation is published): one snapshot per run, upserted
by the job's key (:data:`vbatch.operators.lakehouse.JOB_KEYS`), whose summary properties record
the run (its id, model, options, counts, ``--out``), so ``table.snapshots`` is the run history
and ``--reuse iceberg:NAMESPACE.TABLE`` can compare a run with the table's current snapshot. A
run that fails or is killed before its commit leaves the table at its previous snapshot.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from vbatch.jobs.summary import JobFailed, RunClock, versions
from vbatch.operators.storage import Storage

logger = logging.getLogger(__name__)

#: each command's key in vbatch.operators.lakehouse.JOB_KEYS
TABLE_KEYS = {
    "segment": "segment",
    "reid embed": "reid-embed",
    "reid search": "reid-search",
    "video": "video",
}


def target_of(table: str | None, catalog: str) -> Any:  # -> IcebergTarget | None
    """The job's ``--table`` in ``--catalog``, or ``None`` without one."""
    if not table:
        return None
    from vbatch.operators.lakehouse import IcebergTarget

    return IcebergTarget(table, catalog)


def check_table(target: Any, command: str, schema: pa.Schema) -> None:
    """Before any work: the catalog answers and the table takes ``schema`` (the job's results
    columns and the manifest's passthrough columns); raises naming what does not fit."""
    if target is None:
        return
    from vbatch.operators.lakehouse import JOB_KEYS, prepare

    prepare(target, schema, JOB_KEYS[TABLE_KEYS[command]])


def commit_table(
    target: Any,
    command: str,
    staged: list[str],
    storage: Storage,
    clock: RunClock,
    properties: dict[str, Any],
) -> dict[str, Any]:
    """Upsert the run's staged rows into ``target`` as one snapshot.

    Args:
        properties: the run's record for the snapshot summary (model version, identity, options,
            counts, ``--out``), added to the run id and vbatch's version.

    Returns:
        The summary's ``table`` field: table, snapshot id, rows, attempts, conflicts.

    Raises:
        JobFailed: the catalog refused the commit (nothing is published: the Parquet generation
            is published after the table).
    """
    from vbatch.operators.lakehouse import JOB_KEYS, commit

    if not staged:
        return {"table": target.table, "snapshot_id": None, "rows": 0}
    schema = _staged_schema(staged, storage)
    props = {
        "vbatch.version": versions().get("vbatch") or "",
        **{
            k: v if isinstance(v, str) else json.dumps(v, default=str)
            for k, v in properties.items()
        },
    }
    try:
        info = commit(
            target,
            staged,
            key=JOB_KEYS[TABLE_KEYS[command]],
            schema=schema,
            run_id=clock.run_id,
            properties=props,
            storage=storage,
        )
    except Exception as e:
        raise JobFailed(f"Iceberg table {target.table}: the commit failed: {e}") from e
    logger.info(
        "Iceberg table %s: snapshot %s, %d rows (%d attempts)",
        target.table,
        info.snapshot_id,
        info.rows,
        info.attempts,
    )
    return {
        "table": target.table,
        "catalog": target.catalog,
        "snapshot_id": info.snapshot_id,
        "rows": info.rows,
        "rows_replaced": info.rows_replaced,
        "files_added": info.files_added,
        "attempts": info.attempts,
        "conflicts": list(info.conflicts),
        "columns_added": list(info.columns_added),
        "created": info.created,
        "seconds": round(info.seconds, 3),
    }


def table_step(
    table: str | None,
    catalog: str,
    command: str,
    storage: Storage,
    clock: RunClock,
    properties: Callable[[Any], dict[str, Any]],
) -> Callable[[list[str], Any], dict[str, Any]] | None:
    """The finishing tail's ``--table`` step (``jobs.finish.Tail.table``): commits the staged
    files with the snapshot ``properties`` that ``properties(outcome)`` gives; ``None`` without a
    table."""
    target = target_of(table, catalog)
    if target is None:
        return None

    def commit(files: list[str], outcome: Any) -> dict[str, Any]:
        return commit_table(
            target,
            command,
            files,
            storage,
            clock,
            {"vbatch.command": command, **properties(outcome)},
        )

    return commit


def _staged_schema(staged: list[str], storage: Storage) -> pa.Schema:
    """The schema of the staged files, unified (a passthrough column null in one file)."""
    import pyarrow.parquet as pq

    schemas = []
    for uri in staged:
        afs, path = storage.arrow_fs(uri)
        schemas.append(pq.read_schema(path, filesystem=afs))
    return pa.unify_schemas(schemas, promote_options="permissive")
