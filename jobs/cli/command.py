"""What every command module is, and how a job command runs.

A command module (``vbatch.jobs.cli.<name>``) exposes the same three things:

* ``register(sub)``: add its parser to the ``vbatch`` (or ``vbatch reid``) sub-parsers; the parser's
  defaults name the module (``command_module``), which is how :func:`vbatch.jobs.cli.main`
  dispatches;
* ``config(args)``: its configuration from the parsed arguments (public, so that tests and other
  commands build the same configuration the CLI does);
* ``run(args, clock)``: do the work, print the human report, and return the run's summary (a row
  job's :func:`vbatch.jobs.summary.job_record`, or a dict of facts) — or, for a command that is
  not a job (``report``, ``env``, ``demo``, ``matting convert``), ``run(args)`` returning its exit
  code; such a module sets ``JOB = False``.

A job module may also name where its visual report goes (``report_target(args, record)``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from types import ModuleType
from typing import Any

logger = logging.getLogger("vbatch")


def command_name(args: argparse.Namespace) -> str:
    """``"segment"``, ``"reid embed"`` …: the command as the summary names it."""
    return str(getattr(args.command_module, "NAME", args.command))


def run_job(module: ModuleType, args: argparse.Namespace) -> int:
    """A job command: run it under :func:`vbatch.jobs.summary.run_command` (exit code, summary
    JSON), then write its visual report."""
    from vbatch.jobs.summary import run_command

    def job(clock: Any) -> dict[str, Any]:
        record = module.run(args, clock)
        target = getattr(module, "report_target", _out_of)(args, record)
        write_report(target, args, record)
        return record

    try:
        return run_command(command_name(args), args, job)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def run_tool(module: ModuleType, args: argparse.Namespace) -> int:
    """A command that is not a job: its exit code, or 1 with one clear line on a failure."""
    from vbatch.jobs.failure import describe_failure

    try:
        return int(module.run(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the whole command failed: one clear line, the traceback with -v
        if args.verbose:
            logger.exception("failed")
        print(f"vbatch {command_name(args)}: error: {describe_failure(e)}", file=sys.stderr)
        return 1


def _out_of(args: argparse.Namespace, record: dict[str, Any]) -> str | None:
    return record.get("out")


def write_report(target: str | None, args: argparse.Namespace, record: dict[str, Any]) -> None:
    """``<target>/report/`` after a finished job (``--report-samples`` > 0); a failure is logged as
    a warning and never changes the job's exit status."""
    samples = getattr(args, "report_samples", 0)
    if samples <= 0 or not target:
        return
    try:
        from vbatch.jobs.report import build_report
        from vbatch.operators.storage import Storage, StorageOptions

        info = build_report(
            target, Storage(StorageOptions(endpoint_url=args.s3_endpoint)), samples=samples
        )
        # logged (stderr), not printed: stdout stays the job's report and --summary-json -
        logger.info("report: %s", info.index_uri)
    except Exception as e:
        logger.warning("the run's report could not be written: %s: %s", type(e).__name__, e)


def storage_of(args: argparse.Namespace) -> Any:
    """The storage layer the arguments ask for (``--s3-endpoint``)."""
    from vbatch.operators.storage import Storage, StorageOptions

    return Storage(StorageOptions(endpoint_url=args.s3_endpoint))
