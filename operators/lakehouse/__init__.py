"""A job's results in an Apache Iceberg table, upserted by key, one snapshot per run.

``pip install 'vbatch[iceberg]'``; docs/ICEBERG.md has the catalog set-up and queries::

    target = IcebergTarget("ml.segment_results", catalog="default")
    prepare(target, schema, JOB_KEYS["segment"])         # before any work; writes nothing
    info = commit(target, staged_files, key=JOB_KEYS["segment"], schema=schema, run_id=run_id,
                  properties={"vbatch.model-version": …}, storage=storage)     # -> CommitInfo
    read_current(target, columns=[…], snapshot_id=None)                       # -> pa.Table
    current_summary(target)        # the last run's record (snapshot summary)  -> dict[str, str]
    export_current(target, folder, storage, columns=[…])  # Parquet files for --reuse -> [uri]

:mod:`.catalog` opens the catalog the pyiceberg way; :mod:`.keys` declares each job's key;
:mod:`.schema` decides what evolves and what is refused, and the layout of a new table;
:mod:`.upsert` writes and commits.
"""

from vbatch.operators.lakehouse.catalog import (
    IcebergError,
    IcebergTarget,
    current_summary,
    export_current,
    load_catalog,
    read_current,
)
from vbatch.operators.lakehouse.keys import JOB_KEYS, TableKey
from vbatch.operators.lakehouse.schema import BUCKETS, prepare
from vbatch.operators.lakehouse.upsert import RUN_ID, CommitConflictError, CommitInfo, commit

__all__ = [
    "BUCKETS",
    "JOB_KEYS",
    "RUN_ID",
    "CommitConflictError",
    "CommitInfo",
    "IcebergError",
    "IcebergTarget",
    "TableKey",
    "commit",
    "current_summary",
    "export_current",
    "load_catalog",
    "prepare",
    "read_current",
]
