"""The ``vbatch`` command line: a table of commands, one module each.

Each command module (:mod:`vbatch.jobs.cli.command` says what it exposes) registers its parser,
builds its configuration from the arguments and runs it; this module only puts them together.
Nothing heavy is imported until a command runs: ``vbatch --help`` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from vbatch.jobs.cli.command import run_job, run_tool
from vbatch.jobs.cli.options import EPILOG, Parser

#: the commands, in --help's order; each is the module vbatch.jobs.cli.<name>
COMMANDS = ("segment", "video", "matting", "reid", "backfill", "report", "env", "demo")

#: seconds between Ray Data's progress snapshots when stdout is not a terminal
NON_TTY_PROGRESS_SECONDS = 60


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="vbatch",
        description="Batch inference for computer-vision models on Ray Data.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(
        parser_class=Parser, dest="command", metavar="COMMAND", required=True
    )
    for name in COMMANDS:
        importlib.import_module(f"vbatch.jobs.cli.{name}").register(sub)
    return parser


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("botocore", "s3fs", "fsspec", "urllib3", "aiobotocore", "PIL", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # Off a terminal (cron, CI) Ray Data logs an 11-line progress snapshot instead of drawing bars;
    # its default of one every 10 s floods the logs of a nightly job. Read at the first execution.
    os.environ.setdefault("RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL", str(NON_TTY_PROGRESS_SECONDS))
    if getattr(args, "io_retry_seconds", None) is not None:
        # read by StorageOptions on the driver, which ships the value to every worker
        os.environ["VBATCH_IO_RETRY_SECONDS"] = str(args.io_retry_seconds)
    module = args.command_module
    return run_job(module, args) if getattr(module, "JOB", True) else run_tool(module, args)


if __name__ == "__main__":
    sys.exit(main())
