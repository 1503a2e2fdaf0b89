"""``vbatch backfill``: an image job over many date partitions in one Ray session."""

from __future__ import annotations

import argparse
import sys
from types import ModuleType
from typing import Any

from vbatch.jobs.cli.command import logger, write_report

NAME = "backfill"
JOB = False
#: the job commands a backfill can run per partition: their argv → the command module
PARTITION_JOBS = {("segment",): "segment", ("reid", "embed"): "reid_embed"}


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        NAME,
        help="run an image job over many date partitions in one Ray session",
        description=(
            "Run `segment` or `reid embed` once per date, in one Ray session: every {date} in the "
            "job's arguments (after --) becomes the partition's date (YYYY-MM-DD). Each partition is "
            "published atomically to its own --out with its own run.json and _SUCCESS; a rerun skips "
            "the partitions whose _SUCCESS records a finished run (exit 0 or 3) of the same "
            "configuration, and a partition that crashed resumes. The partitions to run go through one "
            "pipeline and one actor pool (actors start and load the model once); each partition is "
            "still counted, checked and published on its own. Exit status: the worst partition's "
            "(1 > 3 > 0)."
        ),
        epilog="example: vbatch backfill --dates 2026-10-01..2026-10-10 -- segment --task salient "
        "--manifest 's3://cat/{date}.parquet' --model-dir s3://models/salient --out 's3://cat/masks/{date}'",
    )
    p.set_defaults(command_module=sys.modules[__name__])
    p.add_argument(
        "--dates",
        required=True,
        metavar="SPEC",
        help="FIRST..LAST (inclusive) or a comma-separated list of ISO dates",
    )
    p.add_argument("--force", action="store_true", help="also redo partitions that finished before")
    p.add_argument(
        "--separate",
        action="store_true",
        help="run the partitions one after another, each with its own actor pool (default: all "
        "through one pipeline and one actor pool)",
    )
    p.add_argument(
        "--summary-json",
        metavar="PATH|-",
        help="write the backfill's summary (every partition's status) as JSON to PATH, or as the "
        "last line of stdout with -",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument(
        "job",
        nargs=argparse.REMAINDER,
        metavar="-- JOB ARGS",
        help="the job command line: segment … or reid embed …, with {date} in --manifest and --out",
    )
    return p


class PartitionJob:
    """A job command module run per partition (:class:`vbatch.jobs.backfill.PartitionCommand`)."""

    def __init__(self, module: ModuleType, parser: argparse.ArgumentParser, verbose: bool) -> None:
        self.module, self.parser, self.verbose = module, parser, verbose
        self.name: str = module.NAME

    def parse(self, argv: list[str]) -> argparse.Namespace:
        return self.parser.parse_args(argv)

    def run_key(self, args: argparse.Namespace) -> str | None:
        from vbatch.jobs.cli.command import storage_of
        from vbatch.jobs.image_pipeline import resolve_config
        from vbatch.jobs.runtime import ensure_ray
        from vbatch.jobs.segment import image_run_key

        try:
            cfg = self.module.config(args)
            ensure_ray(cfg.address, forward_s3_env=cfg.forward_s3_env)
            # the key of the run: with the precision it resolves to (a default of auto is bf16
            # or fp32 by the device), as the job computes it
            return image_run_key(resolve_config(cfg)[0], storage_of(args))[0]
        except Exception as e:  # the partition runs, and fails with the reason
            logger.info("backfill: no run key for %s (%s): it runs", args.out, e)
            return None

    def run(self, args: argparse.Namespace, clock: Any) -> dict[str, Any]:
        record: dict[str, Any] = self.module.run(args, clock)
        write_report(record.get("out"), args, record)
        return record

    def run_shared(self, parsed: list[argparse.Namespace], clocks: list[Any]) -> list[dict]:
        from vbatch.jobs.cli.segment import run_shared
        from vbatch.jobs.limits import EXIT_FAILED

        cfgs = [self.module.config(a) for a in parsed]
        records = run_shared(self.name, cfgs, clocks, self.verbose)
        for args, record in zip(parsed, records, strict=True):
            if record["exit_code"] != EXIT_FAILED:
                write_report(record.get("out"), args, record)
        return records


def config(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(the dates, the job's command line) of a backfill; a usage error (exit 2) when either is
    not valid."""
    from vbatch.jobs.backfill import parse_dates
    from vbatch.jobs.cli import build_parser

    job = args.job[1:] if args.job[:1] == ["--"] else args.job
    if not any(tuple(job[: len(k)]) == k for k in PARTITION_JOBS):
        build_parser().error("backfill: give the job after --: segment … or reid embed …")
    try:
        return parse_dates(args.dates), job
    except ValueError as e:
        build_parser().error(str(e))


def run(args: argparse.Namespace) -> int:
    """``vbatch backfill``: the job per date in one session; exit status the worst partition's."""
    import importlib

    from vbatch.jobs.backfill import report, run_backfill
    from vbatch.jobs.cli import build_parser
    from vbatch.jobs.failure import describe_failure
    from vbatch.jobs.summary import emit

    dates, job = config(args)
    module = next(
        importlib.import_module(f"vbatch.jobs.cli.{name}")
        for k, name in PARTITION_JOBS.items()
        if tuple(job[: len(k)]) == k
    )
    command = PartitionJob(module, build_parser(), args.verbose)
    try:
        summary = run_backfill(dates, job, command, force=args.force, shared=not args.separate)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # before any partition ran (bad templates, no Ray)
        if args.verbose:
            logger.exception("failed")
        print(f"vbatch backfill: error: {describe_failure(e)}", file=sys.stderr)
        return 1
    print(report(summary))
    emit(summary, args.summary_json)
    return int(summary["exit_code"])
