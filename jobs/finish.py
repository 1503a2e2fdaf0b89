"""The one finishing tail of every row job: count the staged rows, check them, publish, record.

A row job (``segment``, ``reid embed``, ``reid search --out``, ``video``) ends the same way once
Ray has staged its result rows (:func:`vbatch.jobs.publish.stage`):

1. **account**: read the staged files and check that every input row is there exactly once
   (the job's own rule: one row per image, ``k`` hits or one error per query, rows per video
   frame); an accounting error fails the job before anything is published;
2. **limits**: more infrastructure errors than ``--max-infra-error-rate`` fail it too;
3. **publish** the staged files as a new generation (:func:`vbatch.jobs.publish.publish`);
4. whatever the job does with a published table (video renders);
5. **record**: the summary (:func:`vbatch.jobs.summary.job_record`) and ``run.json``/``_SUCCESS``.

A job differs only in its accounting (:class:`Tail.account`) and the facts it records.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vbatch.jobs.limits import Limits
from vbatch.jobs.publish import publish, write_run_record
from vbatch.jobs.summary import Counts, RunClock, check_infrastructure, job_record
from vbatch.operators.storage import Storage


@dataclass
class Outcome:
    """What a job's accounting found in its staged files.

    Attributes:
        counts: the rows as the limits and the summary count them (per image, per query…).
        rows: rows of the table to publish (recorded in the generation's ``_SUCCESS``).
        table: the staged rows as read (the columns the accounting needed), or ``None``.
        details: the job's own findings (a video job's per-video counts…).
    """

    counts: Counts
    rows: int
    table: Any = None
    details: Any = None


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
    generation = publish(
        tail.out, tail.storage, clock.run_id, staged, outcome.rows, staging_name=tail.staging_key
    )
    if tail.after_publish is not None:
        tail.after_publish(outcome)
    record = job_record(
        tail.command, clock, outcome.counts, tail.limits, **tail.facts(outcome, generation)
    )
    write_run_record(tail.out, tail.storage, {**record, **tail.run_extra})
    return record, outcome
