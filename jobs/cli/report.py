"""``vbatch report``: (re)build a run's visual QA report, ``<out>/report/index.html``."""

from __future__ import annotations

import argparse
import sys

from vbatch.jobs.cli import options
from vbatch.jobs.cli.command import storage_of

NAME = "report"
JOB = False


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        NAME,
        help="(re)build a run's visual QA report, <out>/report/index.html",
        description=(
            "Build <out>/report/ from what a finished job left on storage (its results table, "
            "run.json, products and inputs): the run at a glance, errors by class, a contact sheet "
            "of a deterministic sample, the images worth a look, distributions and, when the "
            "manifest had gt_mask_uri (gt_mask_dir for videos), quality metrics; for `reid search "
            "--out`, the gallery index and sample queries with their top hits. Given a `reid "
            "index` folder, the index's page (<index>/report/). One self-contained folder "
            "(index.html, thumbnails, plots) that works opened from disk or served from a bucket. "
            "Jobs write it at the end of every run; this rebuilds it (old runs, backfilled "
            "partitions) or compares two runs. Runs in this process (no Ray)."
        ),
    )
    p.set_defaults(command_module=sys.modules[__name__])
    p.add_argument(
        "--out", required=True, metavar="URI", help="a finished job's --out, or an index folder"
    )
    p.add_argument(
        "--report-samples",
        type=int,
        default=48,
        metavar="N",
        help="images in the contact sheet (default 48; re-ID queries: at most 24)",
    )
    p.add_argument(
        "--compare",
        metavar="OTHER_OUT",
        help="another run of the same manifest (e.g. another model version): metric deltas and "
        "the images whose outputs changed most",
    )
    options.add_common(p, ray=False)
    return p


def config(args: argparse.Namespace) -> dict:
    """The keyword arguments of :func:`vbatch.jobs.report.build_report` (but where and storage)."""
    return {"samples": args.report_samples, "compare": args.compare}


def run(args: argparse.Namespace) -> int:
    from vbatch.jobs.report import build_report

    report = build_report(args.out, storage_of(args), **config(args))
    print(
        f"report: {report.index_uri} ({report.rows:,} rows; "
        f"{report.parquet_bytes / 1e6:.1f} MB of Parquet read, {report.rows_opened} rows "
        f"opened, {report.seconds:.1f} s)"
    )
    return 0
