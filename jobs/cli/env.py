"""``vbatch env``: versions, GPUs, faiss and ONNX Runtime providers (for bug reports)."""

from __future__ import annotations

import argparse
import json
import sys

NAME = "env"
JOB = False


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        NAME,
        help="versions, GPUs, faiss and ONNX Runtime providers (for bug reports)",
        description=(
            "Print the versions of vbatch and the libraries it runs on, whether torch sees CUDA and "
            "which GPUs, faiss's GPU count, ONNX Runtime's providers and, with --address, the Ray "
            "cluster's nodes and resources."
        ),
    )
    p.set_defaults(command_module=sys.modules[__name__])
    p.add_argument("--address", metavar="ADDR", help="also describe this Ray cluster")
    p.add_argument("--json", action="store_true", help="print JSON instead of lines")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def config(args: argparse.Namespace) -> dict:
    return {"address": args.address}


def run(args: argparse.Namespace) -> int:
    from vbatch.jobs.env import collect_env, format_env

    info = collect_env(**config(args))
    print(json.dumps(info, indent=2, default=str) if args.json else format_env(info))
    return 0
