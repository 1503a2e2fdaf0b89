"""``vbatch reid add``: add a new day's embeddings to an existing index (no retraining)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from vbatch.jobs.cli import options
from vbatch.jobs.cli.command import storage_of
from vbatch.jobs.cli.reid_index import start_workers

NAME = "reid add"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "add", help="add a new day's embeddings to an existing index (no retraining)"
    )
    p.set_defaults(command_module=sys.modules[__name__])
    p.add_argument(
        "--index", required=True, metavar="URI", help="index folder written by `reid index`"
    )
    p.add_argument(
        "--embeddings",
        required=True,
        metavar="URI",
        help="the new embeddings (`reid embed` output); image_ids already indexed are skipped",
    )
    options.add_index_workers(p)
    options.add_common(p)
    options.add_run_arguments(p, rows=False)
    options.add_report_option(
        p, "<index>/report/index.html: the index and N sample gallery images searched"
    )
    return p


def config(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of :func:`vbatch.operators.index.add_to_index`."""
    return {"workers": args.workers}


def run(args: argparse.Namespace, clock: Any) -> dict[str, Any]:
    from vbatch.operators.index import add_to_index

    start_workers(args, {"--embeddings": args.embeddings, "--index": args.index})
    info = add_to_index(args.index, args.embeddings, storage_of(args), **config(args))
    print(info.to_json())
    return json.loads(info.to_json())


def report_target(args: argparse.Namespace, record: dict[str, Any]) -> str:
    return str(args.index)
