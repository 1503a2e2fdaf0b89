"""How every job lands its results table: staged, then published, then recorded.

Ray writes the results under ``<out>/.staging/<run id>/``; only a complete write replaces
``<out>/results/`` (a rename locally; copy + delete on S3), so readers never see a half-written
table and a repeated run never duplicates rows. ``<out>/run.json`` records the run.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import ray

from vbatch.operators.storage import Storage, join


def read_table(uri: str, storage: Storage, columns: list[str] | None = None) -> pa.Table:
    """All Parquet files under ``uri`` (a job's ``--out``, its ``results/``, or one file), staged
    writes left out."""
    files = [f for f in storage.list_files(uri, suffix=".parquet") if "/.staging/" not in f]
    if not files:
        raise FileNotFoundError(f"no Parquet files under {uri}")
    fs, _ = storage.arrow_fs(files[0])
    return pads.dataset(
        [storage.arrow_fs(f)[1] for f in files], filesystem=fs, format="parquet"
    ).to_table(columns=columns)


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


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


def write_and_publish(ds: ray.data.Dataset, out: str, storage: Storage, run_id: str) -> str:
    """Execute ``ds`` into ``<out>/.staging/<run_id>`` and publish it as ``<out>/results``; returns the latter."""
    staging = join(out, ".staging", run_id)
    results = join(out, "results")
    fs, staging_path = storage.arrow_fs(staging)
    storage.makedirs(staging)
    ds.write_parquet(staging_path, filesystem=fs)
    storage.delete(results, recursive=True)
    storage.move(staging, results)
    return results


def write_run_record(
    out: str, storage: Storage, run_id: str, config: Any, summary: Any, files: Any
) -> None:
    """``<out>/run.json``: the configuration, the summary and the manifest files of the run."""
    record = {
        "config": asdict(config),
        "summary": asdict(summary),
        "run_id": run_id,
        "manifest_files": files,
    }
    storage.write_bytes(join(out, "run.json"), json.dumps(record, indent=2, default=str).encode())
