"""``vbatch demo``: demo data and random-weight models, every job run locally."""

from __future__ import annotations

import argparse
import sys

from vbatch.jobs.cli import options

NAME = "demo"
JOB = False


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        NAME,
        help="generate demo data and a random-weight model, run the job locally",
        description=(
            "Creates demo images, a Parquet manifest and model directories in ModelScope's layout with RANDOM "
            "weights (no weights can be downloaded here), runs the jobs on local Ray and prints where "
            "everything is. The masks show that the pipeline works, not what a trained model sees."
        ),
    )
    p.set_defaults(command_module=sys.modules[__name__])
    p.add_argument(
        "--out", default="vbatch-demo", metavar="DIR", help="demo folder (default: ./vbatch-demo)"
    )
    p.add_argument(
        "--images",
        type=int,
        default=24,
        metavar="N",
        help="number of generated images (default 24)",
    )
    options.add_common(p)
    return p


def config(args: argparse.Namespace) -> dict:
    """The keyword arguments of :func:`vbatch.jobs.demo.run_demo`."""
    return {"out": args.out, "num_images": args.images, "address": args.address}


def run(args: argparse.Namespace) -> int:
    from vbatch.jobs.demo import run_demo

    return run_demo(**config(args))
