"""``vbatch reid``: the person re-ID commands, one module each (``reid_<command>.py``)."""

from __future__ import annotations

import argparse
import importlib

from vbatch.jobs.cli import options

NAME = "reid"
#: the sub-commands, in --help's order; each is the module vbatch.jobs.cli.reid_<name>
SUBCOMMANDS = ("embed", "index", "add", "search", "eval")


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        NAME,
        help="person re-ID: embed, index, add, search, eval",
        description="Person re-ID with PASS ViT-B/16 (damo/cv_passvitb_image-reid-person_market) and a FAISS gallery.",
    )
    rsub = p.add_subparsers(
        parser_class=options.Parser, dest="reid_command", metavar="COMMAND", required=True
    )
    for name in SUBCOMMANDS:
        importlib.import_module(f"vbatch.jobs.cli.reid_{name}").register(rsub)
    return p
