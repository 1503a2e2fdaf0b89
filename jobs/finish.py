"""The one finishing tail of every row job: count the staged rows, check them, publish, record.

A row job (``segment``, ``reid embed``, ``reid search --out``, ``video``) ends the same way once
Ray has staged its result rows (:func:`vbatch.jobs.publish.stage`):

1. **account**: read the staged files and check that every input row is there exactly once
   (the job's own rule: one row per image, ``k`` hits or one error per query, rows per video
   frame); an accounting error fails the job before anything is published;
2. **limits**: more infrastructure errors than ``--max-infra-error-rate`` fail it too;
3. **lease**: the run still holds its ``--out`` (:mod:`vbatch.jobs.lease`);
4. **publish** the staged files as a new generation with its commit record (what it was
   computed with) and the product folders its rows reference (:func:`vbatch.jobs.publish.publish`);
5. whatever the job does with a published table (video renders);
6. **record**: the summary (:func:`vbatch.jobs.summary.job_record`) and ``run.json``/``_SUCCESS``.

Once the pointer has moved the run is published: a failure in steps 5-6 is a warning, never
exit 1 ("nothing new published" would be false). A job differs only in its accounting
(:class:`Tail.account`), its commit record and the facts it records.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vbatch.jobs.limits import Limits
from vbatch.jobs.publish import InjectedFault, product_dirs, publish, write_run_record
from vbatch.jobs.summary import Counts, RunClock, check_infrastructure, job_record
from vbatch.operators.storage import Storage

logger = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What a job's accounting found in its staged files.

    Attributes:
        counts: the rows as the limits and the summary count them (per image, per query…).
        rows: rows of the table to publish (recorded in the generation's ``_SUCCESS``).
        table: the staged rows as read (the columns the accounting needed), or ``None``.
        details: the job's own findings (a video job's per-video counts…).
        files: the staged files to publish when the accounting changed them (it dropped rows a
            retried task had staged twice), else ``None``: the files as staged.
    """

    counts: Counts
    rows: int
    table: Any = None
    details: Any = None
    files: list[str] | None = None


@dataclass
class Tail:
    """How one job finishes.

    Attributes:
        command: the command named in the summary (``"segment"``, ``"reid embed"`` …).
        out: the job's ``--out`` (normalised).
        storage: reaches it.
        limits: the run's error-rate limits.
        what: what a row is, for messages (``"images"``, ``"queries"`` …).
        account: staged files → :class:`Outcome`; raises ``JobFailed`` on an accounting error.
        facts: (outcome, generation folder) → the job's fields of the summary.
        staging_key: the staging folder's name (the run key of resumable jobs; default the run id).
        run_extra: what ``run.json`` holds besides the summary (configuration, manifest files…).
        after_publish: runs once the table is committed, before the summary (video renders).
        commit: the commit record: what the generation was computed with (model identity, the
            options that decide results, the run key), read back by ``--reuse`` and backfills.
        product_columns: the result columns holding product URIs (their folders are kept).
        lease: the run's lease on ``out`` (checked before the commit), if it took one.
        table: commits the staged rows to the run's Iceberg table (``--table``) and returns the
            summary's ``table`` facts: run right before the Parquet generation is published.
            With a table, no product folder is removed: its snapshots (time travel) name them.
    """

    command: str
    out: str
    storage: Storage
    limits: Limits
    what: str
    account: Callable[[list[str]], Outcome]
    facts: Callable[[Outcome, str], dict[str, Any]]
    staging_key: str | None = None
    run_extra: dict[str, Any] = field(default_factory=dict)
    after_publish: Callable[[Outcome], None] | None = None
    commit: dict[str, Any] = field(default_factory=dict)
    product_columns: tuple[str, ...] = ()
    lease: Any = None  # jobs.lease.Lease
    table: Callable[[list[str], Outcome], dict[str, Any]] | None = None


def finish(tail: Tail, clock: RunClock, staged: list[str]) -> tuple[dict[str, Any], Outcome]:
    """Account, check, publish and record a job whose rows are staged in ``staged``.

    Returns:
        (the run's summary, the accounting's outcome).

    Raises:
        JobFailed: an accounting error or too many infrastructure errors; nothing new is
            published then (the previous table stays committed).
    """
    outcome = tail.account(staged)
    check_infrastructure(outcome.counts, tail.limits, tail.what)
    if tail.lease is not None:
        tail.lease.check()
    files = outcome.files if outcome.files is not None else staged
    # the table first: a commit the catalog refuses fails the run before anything is published
    table = tail.table(files, outcome) if tail.table is not None else None
    generation = publish(
        tail.out,
        tail.storage,
        clock.run_id,
        files,
        outcome.rows,
        staging_name=tail.staging_key,
        record={"command": tail.command, **tail.commit},
        product_dirs=product_dirs(outcome.table, tail.out, tail.product_columns),
        clean_products=tail.table is None,
    )
    if tail.after_publish is not None:
        _published(lambda: tail.after_publish(outcome), tail.out)  # type: ignore[misc]
    facts = tail.facts(outcome, generation) | ({"table": table} if table is not None else {})
    record = job_record(tail.command, clock, outcome.counts, tail.limits, **facts)
    _published(
        lambda: write_run_record(tail.out, tail.storage, {**record, **tail.run_extra}), tail.out
    )
    return record, outcome


def _published(step: Callable[[], None], out: str) -> None:
    """A step after the commit: its failure is logged, the run stays published (a crash injected
    by the tests still propagates, as a killed driver would stop there)."""
    try:
        step()
    except InjectedFault:
        raise
    except Exception as e:
        logger.warning(
            "%s is published; a step after the commit failed: %s: %s", out, type(e).__name__, e
        )
