"""A run's contract with its scheduler: the exit code (:mod:`vbatch.jobs.limits`) and the
machine-readable summary.

The summary (``--summary-json PATH|-``, and ``<out>/run.json``) is one JSON object; see
:func:`job_record` for its fields. A command that is not a row job (``reid index`` …) only
returns a dict of its own facts from the function given to :func:`run_command`, which adds the
common fields (command, run id, times, versions, exit status) and handles failures.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import logging
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from vbatch.jobs.limits import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_TOO_MANY_ERRORS,
    STATUS_BY_EXIT,
    Limits,
)
from vbatch.operators.redact import redact_uri, redact_value
from vbatch.schemas.errors import INFRASTRUCTURE, classify_errors

logger = logging.getLogger(__name__)

#: error rows shown in the summary and the report
SAMPLE_ERRORS = 5


class JobFailed(RuntimeError):
    """The job as a whole failed (exit 1); ``record`` holds what it had counted, if anything."""

    def __init__(self, message: str, record: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.record = record


def new_run_id() -> str:
    """A sortable, unique id: ``20261129T221500Z-1a2b3c`` (UTC)."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


@dataclass
class RunClock:
    """When a run started, in wall-clock (for the record) and monotonic (for durations) time."""

    run_id: str = field(default_factory=new_run_id)
    started: float = field(default_factory=time.time)
    perf: float = field(default_factory=time.perf_counter)

    def seconds(self) -> float:
        return time.perf_counter() - self.perf


def utc_iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="seconds")


def versions() -> dict[str, str | None]:
    """Versions of vbatch and the libraries a result depends on (``None``: not installed)."""

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {name: version(name) for name in ("vbatch", "torch", "ray", "pyarrow")} | {
        "python": sys.version.split()[0]
    }


# -- counting with Arrow ---------------------------------------------------------------------------
def _counts(values: pa.ChunkedArray | pa.Array) -> dict[str, int]:
    """``{value: count}`` of the non-null values (Arrow's hash aggregation; no Python per row)."""
    counted = pc.value_counts(values.drop_null() if len(values) else values)
    return {
        v: int(c)
        for v, c in zip(
            counted.field("values").to_pylist(), counted.field("counts").to_pylist(), strict=True
        )
    }


@dataclass
class Counts:
    """Rows by status and by error class, and a few error rows, of a results table."""

    rows: int
    by_status: dict[str, int]
    by_error_class: dict[str, int]
    #: (id, error) of the first few error rows
    sample_errors: list[tuple[str | None, str]]

    @property
    def errors(self) -> int:
        return self.rows - self.by_status.get("ok", 0)

    @property
    def infrastructure_errors(self) -> int:
        return self.by_error_class.get(INFRASTRUCTURE, 0)


def count_rows(table: pa.Table, id_column: str) -> Counts:
    """:class:`Counts` of a results table with ``status`` and ``error`` (and ``error_class``, else
    classified here from ``error``)."""
    error_class = (
        table.column("error_class")
        if "error_class" in table.column_names
        else classify_errors(table.column("error"))
    )
    failed = table.filter(pc.not_equal(table.column("status"), "ok"))
    sample = failed.select([id_column, "error"]).slice(0, SAMPLE_ERRORS).to_pylist()
    return Counts(
        rows=table.num_rows,
        by_status=_counts(table.column("status")),
        by_error_class=_counts(error_class),
        # the rows' own texts are redacted where they are built; these are echoed to stdout, XCom
        # and run.json, so the few shown are redacted again whoever wrote the table
        sample_errors=[
            (r[id_column], redact_uri(r["error"]) if r["error"] else r["error"]) for r in sample
        ],
    )


def check_infrastructure(counts: Counts, limits: Limits, what: str = "rows") -> None:
    """``JobFailed`` when more than ``limits.max_infra_error_rate`` of the rows hit
    infrastructure errors (the store was down: publishing a table of errors helps nobody)."""
    rate = counts.infrastructure_errors / counts.rows if counts.rows else 0.0
    if rate > limits.max_infra_error_rate:
        raise JobFailed(
            f"{counts.infrastructure_errors} of {counts.rows} {what} hit infrastructure errors "
            f"({rate:.1%} > --max-infra-error-rate {limits.max_infra_error_rate:.1%}); nothing was "
            "published, rerun when storage is reachable",
            record={
                "rows": counts.rows,
                "by_status": counts.by_status,
                "by_error_class": counts.by_error_class,
                "infrastructure_error_rate": rate,
                "max_infra_error_rate": limits.max_infra_error_rate,
                "sample_errors": [{"id": i, "error": e} for i, e in counts.sample_errors],
            },
        )


# -- records ---------------------------------------------------------------------------------------
def job_record(
    command: str,
    clock: RunClock,
    counts: Counts,
    limits: Limits,
    **facts: Any,
) -> dict[str, Any]:
    """The summary of a row job that finished, with its exit status.

    Fields: ``command, run_id, status ("ok" | "too_many_errors" | "failed"), exit_code, rows,
    by_status, by_error_class, error_rate, infrastructure_error_rate, max_error_rate,
    max_infra_error_rate, seconds, rows_per_second, started_at, ended_at (UTC ISO 8601), versions,
    sample_errors`` and the job's ``facts`` (``task, model_version, results_uri, out,
    images_per_second`` …).
    """
    seconds = clock.seconds()
    error_rate = counts.errors / counts.rows if counts.rows else 0.0
    exit_code = EXIT_OK if error_rate <= limits.max_error_rate else EXIT_TOO_MANY_ERRORS
    return {
        "command": command,
        "run_id": clock.run_id,
        "status": STATUS_BY_EXIT[exit_code],
        "exit_code": exit_code,
        "rows": counts.rows,
        "by_status": counts.by_status,
        "by_error_class": counts.by_error_class,
        "error_rate": error_rate,
        "infrastructure_error_rate": (
            counts.infrastructure_errors / counts.rows if counts.rows else 0.0
        ),
        "max_error_rate": limits.max_error_rate,
        "max_infra_error_rate": limits.max_infra_error_rate,
        "seconds": round(seconds, 3),
        "rows_per_second": counts.rows / seconds if seconds > 0 else 0.0,
        **facts,
        "sample_errors": [{"id": i, "error": e} for i, e in counts.sample_errors],
        "started_at": utc_iso(clock.started),
        "ended_at": utc_iso(time.time()),
        "versions": versions(),
    }


def command_record(command: str, clock: RunClock, facts: dict[str, Any]) -> dict[str, Any]:
    """The summary of a command that is not a row job and succeeded (exit 0): its ``facts``
    plus the common fields."""
    return {
        "command": command,
        "run_id": clock.run_id,
        "status": STATUS_BY_EXIT[EXIT_OK],
        "exit_code": EXIT_OK,
        "seconds": round(clock.seconds(), 3),
        **facts,
        "started_at": utc_iso(clock.started),
        "ended_at": utc_iso(time.time()),
        "versions": versions(),
    }


def failed_record(
    command: str, clock: RunClock, error: BaseException, partial: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The summary of a run that failed as a whole (exit 1), with what it had counted."""
    return {
        **(partial or {}),
        "command": command,
        "run_id": (partial or {}).get("run_id", clock.run_id),
        "status": STATUS_BY_EXIT[EXIT_FAILED],
        "exit_code": EXIT_FAILED,
        "error": redact_uri(f"{type(error).__name__}: {error}"),
        "seconds": round(clock.seconds(), 3),
        "started_at": (partial or {}).get("started_at", utc_iso(clock.started)),
        "ended_at": utc_iso(time.time()),
        "versions": versions(),
    }


# -- the scheduler's side ----------------------------------------------------------------------
def emit(record: dict[str, Any], target: str | None, s3_endpoint: str | None = None) -> None:
    """Write ``record`` to ``target``: a path or URI, ``-`` for one line on stdout, ``None``: nowhere.

    Every string in it is redacted (:func:`vbatch.operators.redact.redact_value`): the summary goes
    to schedulers' logs and XCom, and it quotes exception texts that may hold a signed URL."""
    if not target:
        return
    record = redact_value(record)
    if target == "-":
        sys.stderr.flush()
        print(json.dumps(record, default=str), flush=True)
        return
    from vbatch.operators.storage import Storage, StorageOptions

    data = json.dumps(record, indent=2, default=str).encode()
    Storage(StorageOptions(endpoint_url=s3_endpoint)).write_bytes(target, data)


def run_record(
    command: str,
    args: argparse.Namespace,
    fn: Callable[[RunClock], dict[str, Any] | None],
) -> dict[str, Any]:
    """Run one job command; returns its summary (a failure becomes a ``failed`` record, exit 1).

    Args:
        command: e.g. ``"segment"``, ``"reid index"``.
        args: the parsed arguments (``verbose`` is read).
        fn: does the work and prints its human report; returns the summary: a row job's
            :func:`job_record` (which carries its exit code) or a plain dict of facts (exit 0).
            Raising means the job failed as a whole (exit 1).
    """
    clock = RunClock()
    try:
        result = fn(clock) or {}
        record = result if "exit_code" in result else command_record(command, clock, result)
    except Exception as e:  # the whole job failed: one clear line, the traceback with -v
        if getattr(args, "verbose", False):
            logger.exception("failed")
        print(f"vbatch {command}: error: {redact_uri(str(e))}", file=sys.stderr)
        record = failed_record(command, clock, e, e.record if isinstance(e, JobFailed) else None)
    if record["exit_code"] == EXIT_TOO_MANY_ERRORS:
        print(
            f"vbatch {command}: {record['by_status']} — error rate {record['error_rate']:.2%} is "
            f"over --max-error-rate {record['max_error_rate']:.2%} (exit 3)",
            file=sys.stderr,
        )
    return record


def run_command(
    command: str,
    args: argparse.Namespace,
    fn: Callable[[RunClock], dict[str, Any] | None],
) -> int:
    """Run one job command and turn its outcome into an exit code and a summary.

    Args:
        command, args, fn: see :func:`run_record` (``summary_json`` and ``s3_endpoint`` are also
            read from ``args``).

    Returns:
        The exit code.
    """
    record = run_record(command, args, fn)
    try:
        emit(record, getattr(args, "summary_json", None), getattr(args, "s3_endpoint", None))
    except Exception as e:
        print(f"vbatch {command}: error: cannot write --summary-json: {e}", file=sys.stderr)
        return EXIT_FAILED
    return int(record["exit_code"])
