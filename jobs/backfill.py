"""``vbatch backfill``: one image-job command over many date partitions, in one Ray session.

    vbatch backfill --dates 2026-10-01..2026-10-10 -- segment --task salient \\
        --manifest 's3://cat/manifests/{date}.parquet' --model-dir s3://models/salient \\
        --out 's3://cat/masks/{date}'

Every ``{date}`` in the job's arguments is replaced by each date (ISO ``YYYY-MM-DD``); each
partition is a complete run of the job (staged, checked, published atomically to its own
``--out``, with its own ``run.json``, ``_SUCCESS`` and, when the job's arguments name one, its own
``--summary-json``). The ledger is those markers: a partition whose ``<out>/_SUCCESS`` records a
finished run (exit 0 or 3) with the run key the partition has now (options, manifest content,
model content: ``jobs.segment.image_run_key``) is skipped on a rerun (``--force`` redoes it); a
partition that crashed resumes (``jobs.resume``). The
backfill's summary lists every partition's status, and its exit code is the worst partition's
(1 failed > 3 too many error rows > 0).

The partitions to run go through **one Ray Data pipeline and one actor pool**
(:func:`vbatch.jobs.segment.run_image_jobs`): each partition's manifest is fetched and decoded on its
own, the decoded rows of every partition share the model's actors, and a partition column routes
each result row to its own ``--out`` (products) and staging folder; then each partition is
counted, checked and published on its own, so one partition failing its checks fails alone. Ray's
start-up, the actors' start and the model loading are paid once for the whole backfill.
``--separate`` (or partitions whose model options differ: ``{date}`` outside ``--manifest``,
``--out``, ``--reuse``) runs them one after another instead, each with its own pool.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import gc
import json
import logging
from typing import Any, Protocol

from vbatch.jobs.segment import PoolMismatch
from vbatch.jobs.summary import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_TOO_MANY_ERRORS,
    STATUS_BY_EXIT,
    RunClock,
    emit,
    run_record,
    utc_iso,
    versions,
)
from vbatch.operators.storage import Storage, StorageOptions, join, normalize
from vbatch.operators.tables import SUCCESS, commit_record

logger = logging.getLogger(__name__)

DATE = "{date}"
#: exit codes from best to worst
_SEVERITY = {EXIT_OK: 0, EXIT_TOO_MANY_ERRORS: 1, EXIT_FAILED: 2}


def parse_dates(spec: str) -> list[str]:
    """``2026-10-01..2026-10-10`` (inclusive) or ``2026-10-01,2026-10-03``: ISO dates, in order.

    Raises:
        ValueError: not dates, or a range that ends before it starts.
    """
    dates: list[str] = []
    for part in spec.split(","):
        part = part.strip()
        if ".." in part:
            first, last = (dt.date.fromisoformat(x.strip()) for x in part.split("..", 1))
            if last < first:
                raise ValueError(f"--dates {part}: the range ends before it starts")
            dates += [
                (first + dt.timedelta(days=i)).isoformat() for i in range((last - first).days + 1)
            ]
        elif part:
            dates.append(dt.date.fromisoformat(part).isoformat())
    if not dates:
        raise ValueError("--dates names no date")
    if len(set(dates)) != len(dates):
        raise ValueError(f"--dates {spec}: a date appears twice")
    return dates


def partition_argv(job_argv: list[str], date: str) -> list[str]:
    """The job's arguments for one date (every ``{date}`` replaced)."""
    return [a.replace(DATE, date) for a in job_argv]


def worst_exit(codes: list[int]) -> int:
    """The worst of the partitions' exit codes (1 > 3 > 0); 0 for none."""
    return max(codes, key=lambda c: _SEVERITY.get(c, 2), default=EXIT_OK)


def finished_record(out: str, storage: Storage, run_key: str | None) -> dict[str, Any] | None:
    """The run record in ``<out>/_SUCCESS`` when it is a finished run (exit 0 or 3) with run key
    ``run_key``, and the committed generation was computed under that key too; else ``None``.

    The run key covers what decides the results: the options, the manifest files' content
    fingerprints and the model's content identity. So a manifest rewritten at the same path, or
    new weights in the same model directory, make the partition run again.
    """
    if run_key is None:
        return None
    try:
        record = json.loads(storage.read_bytes(join(out, SUCCESS)))
        committed = commit_record(out, storage) or {}
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None
    if record.get("exit_code") not in (EXIT_OK, EXIT_TOO_MANY_ERRORS):
        return None
    if record.get("run_key") != run_key or committed.get("run_key") != run_key:
        return None
    return record


class PartitionCommand(Protocol):
    """The job command a backfill runs per partition (``vbatch.jobs.cli.backfill`` builds it)."""

    #: the command as its summary names it (``"segment"``, ``"reid embed"``)
    name: str

    def parse(self, argv: list[str]) -> argparse.Namespace:
        """One partition's arguments (argument errors surface before anything runs)."""
        ...

    def run_key(self, args: argparse.Namespace) -> str | None:
        """The partition's run key (compared with the one its ``_SUCCESS`` records); ``None``
        when it cannot be computed (a missing manifest: the partition runs and says why)."""
        ...

    def run(self, args: argparse.Namespace, clock: RunClock) -> dict[str, Any]:
        """Run one partition, print its report; its summary (raises when it fails)."""
        ...

    def run_shared(
        self, parsed: list[argparse.Namespace], clocks: list[RunClock]
    ) -> list[dict[str, Any]]:
        """Run several partitions through one pipeline and actor pool, print their reports; their
        summaries in order. Raises :class:`vbatch.jobs.segment.PoolMismatch` when they cannot
        share a pool."""
        ...


def run_backfill(
    dates: list[str],
    job_argv: list[str],
    command: PartitionCommand,
    force: bool = False,
    shared: bool = True,
) -> dict[str, Any]:
    """Run the job once per date, skipping the partitions already finished.

    Args:
        dates: the partitions, in order.
        job_argv: the job's command line with ``{date}`` templates (e.g. ``["segment", …]``).
        command: the job command (parses, configures and runs a partition).
        force: redo finished partitions too.
        shared: run the partitions to do through one pipeline and actor pool (they run one after
            another when they cannot share one, or without ``shared``).

    Returns:
        The backfill's summary: ``command, status, exit_code, partitions`` (``date, out, status,
        exit_code, run_id, rows, skipped``), counts by status, times and versions.
    """
    clock = RunClock()
    parsed = [(date, command.parse(partition_argv(job_argv, date))) for date in dates]
    outs = [normalize(a.out) for _, a in parsed]
    if len(set(outs)) != len(outs):
        raise ValueError("every partition needs its own --out: put {date} in it")
    from vbatch.jobs.runtime import ensure_ray

    ensure_ray(parsed[0][1].address)  # one session for every partition
    done: dict[int, dict[str, Any]] = {}
    for n, ((date, args), out) in enumerate(zip(parsed, outs, strict=True)):
        storage = Storage(StorageOptions(endpoint_url=args.s3_endpoint))
        record = None if force else finished_record(out, storage, command.run_key(args))
        if record is not None:
            logger.info(
                "backfill %s: finished before (run %s), skipped", date, record.get("run_id")
            )
            done[n] = record
    todo = [n for n in range(len(parsed)) if n not in done]
    records: dict[int, dict[str, Any]] = {}
    pooled = False
    if shared and len(todo) > 1:
        try:
            logger.info("backfill: %d partitions through one actor pool", len(todo))
            results = command.run_shared([parsed[n][1] for n in todo], [RunClock() for _ in todo])
            records, pooled = dict(zip(todo, results, strict=True)), True
        except PoolMismatch as e:
            logger.warning(
                "backfill: the partitions cannot share one actor pool (%s); "
                "running them one after another",
                e,
            )
    for n in todo:
        if n in records:
            continue
        date, args = parsed[n]
        logger.info("backfill %s: running %s", date, " ".join(partition_argv(job_argv, date)))
        records[n] = run_record(command.name, args, functools.partial(command.run, args))
        # a dataset that failed keeps its actor pool until its executor is collected: free
        # the pool's CPUs/GPUs for the next partition
        gc.collect()
    for n, record in records.items():
        _partition_summary(record, parsed[n][1])
    partitions: list[dict[str, Any]] = []
    for n, ((date, _), out) in enumerate(zip(parsed, outs, strict=True)):
        record, skipped = (done[n], True) if n in done else (records[n], False)
        partitions.append(
            {
                "date": date,
                "out": out,
                "status": record.get("status"),
                "exit_code": int(record.get("exit_code", EXIT_FAILED)),
                "skipped": skipped,
                "run_id": record.get("run_id"),
                "rows": record.get("rows"),
                "by_status": record.get("by_status"),
                "error": record.get("error"),
            }
        )
    exit_code = worst_exit([p["exit_code"] for p in partitions])
    by_status: dict[str, int] = {}
    for p in partitions:
        key = "skipped" if p["skipped"] else str(p["status"])
        by_status[key] = by_status.get(key, 0) + 1
    return {
        "command": "backfill",
        "run_id": clock.run_id,
        "status": STATUS_BY_EXIT.get(exit_code, "failed"),
        "exit_code": exit_code,
        "job": job_argv,
        "dates": dates,
        "partitions_by_status": by_status,
        "partitions": partitions,
        "shared_pool": pooled,
        "seconds": round(clock.seconds(), 3),
        "started_at": utc_iso(clock.started),
        "ended_at": utc_iso(dt.datetime.now(dt.timezone.utc).timestamp()),
        "versions": versions(),
    }


def _partition_summary(record: dict[str, Any], args: argparse.Namespace) -> None:
    """The partition job's own ``--summary-json``, as the job alone would write it."""
    target = getattr(args, "summary_json", None)
    try:
        emit(record, target, getattr(args, "s3_endpoint", None))
    except Exception as e:  # the backfill's summary still says what happened
        logger.warning("backfill: cannot write the partition's --summary-json %s: %s", target, e)


def report(summary: dict[str, Any]) -> str:
    """Human lines: one per partition, then the totals."""
    lines = []
    for p in summary["partitions"]:
        what = "skipped (finished before)" if p["skipped"] else p["status"]
        rows = f", {p['rows']} rows" if p.get("rows") is not None else ""
        err = f": {p['error']}" if p.get("error") else ""
        lines.append(f"  {p['date']}: {what} (exit {p['exit_code']}{rows}) → {p['out']}{err}")
    counts = ", ".join(f"{k} {v}" for k, v in sorted(summary["partitions_by_status"].items()))
    lines.append(
        f"backfill: {len(summary['partitions'])} partitions — {counts} — "
        f"{summary['seconds']:.1f} s, exit {summary['exit_code']}"
    )
    return "\n".join(lines)
