"""Exit codes and error-rate limits: what a run's outcome is, in terms a scheduler acts on.

Exit codes of every job command (``segment``, ``video``, ``reid embed|index|add|search|eval``):

* ``0`` (:data:`EXIT_OK`): finished; at most ``--max-error-rate`` of the rows are error rows;
* ``3`` (:data:`EXIT_TOO_MANY_ERRORS`): finished and published, but more rows failed than that;
* ``1`` (:data:`EXIT_FAILED`): the job failed as a whole; nothing new was published. This includes
  a job in which more than ``--max-infra-error-rate`` of the rows hit infrastructure errors
  (``error_class == "infrastructure"``): a rerun redoes them;
* ``2``: usage error (argparse's own).

Nothing here imports a framework (the CLI's ``--help`` reads the defaults).
"""

from __future__ import annotations

from dataclasses import dataclass

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_TOO_MANY_ERRORS = 3
STATUS_BY_EXIT = {EXIT_OK: "ok", EXIT_FAILED: "failed", EXIT_TOO_MANY_ERRORS: "too_many_errors"}

#: a nightly catalog has a few broken images; more than 1 % failing is worth a red task
DEFAULT_MAX_ERROR_RATE = 0.01
#: a few retried-out reads are bad luck; more means the store was down: fail, publish nothing
DEFAULT_MAX_INFRA_ERROR_RATE = 0.01


@dataclass(frozen=True)
class Limits:
    """The error fractions a run may have: above ``max_error_rate`` exit 3, above
    ``max_infra_error_rate`` of infrastructure errors exit 1 (nothing published)."""

    max_error_rate: float = DEFAULT_MAX_ERROR_RATE
    max_infra_error_rate: float = DEFAULT_MAX_INFRA_ERROR_RATE
