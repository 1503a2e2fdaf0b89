"""``vbatch reid index``: build a FAISS gallery index from embeddings."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from vbatch.jobs.cli import options
from vbatch.jobs.cli.command import storage_of

NAME = "reid index"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "index",
        help="build a FAISS gallery index from embeddings",
        description=(
            "Builds an inner-product FAISS index of the ok rows of an embeddings table, an id map "
            "(FAISS row -> image_id) and index.json. Without --factory, the index is chosen from the gallery "
            "size and --memory-budget as the FAISS guidelines recommend (flat for small galleries, IVF with a "
            "trained coarse quantizer; when flat vectors do not fit the budget, the largest code that does: "
            "SQ8, RaBitQ with 7 down to 2 bits per dimension, then PQ). Measured recall and sizes: "
            "docs/BENCHMARKS.md."
        ),
    )
    p.set_defaults(command_module=sys.modules[__name__])
    p.add_argument(
        "--embeddings", required=True, metavar="URI", help="output of `reid embed` (folder or file)"
    )
    p.add_argument("--out", required=True, metavar="URI", help="index folder")
    p.add_argument(
        "--factory", metavar="STR", help="explicit FAISS index factory string, e.g. IVF4096,PQ96"
    )
    p.add_argument(
        "--memory-budget",
        metavar="SIZE",
        help="e.g. 2GB: the index must fit (default: flat if it fits 4 GB)",
    )
    p.add_argument(
        "--refine",
        choices=["auto", "on", "off"],
        default="auto",
        help="keep the full vectors beside the index (refine/*.npy, memory-mapped, outside the "
        "budget) and re-rank the top k x r with them; auto: on for an automatic plan with a "
        "compressed code (default auto)",
    )
    p.add_argument(
        "--refine-dtype",
        choices=["float32", "float16"],
        default="float32",
        help="refinement vectors: float32 (exact re-ranking) or float16 (half the disk)",
    )
    options.add_index_workers(p)
    options.add_common(p)
    options.add_run_arguments(p, rows=False)
    options.add_report_option(
        p, "<out>/report/index.html: the index and N sample gallery images searched"
    )
    return p


def config(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of :func:`vbatch.operators.index.build_index`."""
    return {
        "factory": args.factory,
        "memory_budget": args.memory_budget,
        "refine": None if args.refine == "auto" else args.refine == "on",
        "refine_dtype": args.refine_dtype,
        "workers": args.workers,
    }


def start_workers(args: argparse.Namespace, paths: dict[str, str]) -> None:
    """With ``--workers`` > 1 the build runs on Ray: join it, and refuse local ``paths`` on a
    cluster of several nodes."""
    if args.workers > 1:
        from vbatch.jobs.runtime import ensure_ray, refuse_local_paths_on_cluster

        ensure_ray(args.address, forward_s3_env=args.forward_s3_env)
        refuse_local_paths_on_cluster(dict(paths))


def run(args: argparse.Namespace, clock: Any) -> dict[str, Any]:
    from vbatch.operators.index import build_index

    start_workers(args, {"--embeddings": args.embeddings, "--out": args.out})
    info = build_index(args.embeddings, args.out, storage_of(args), **config(args))
    print(info.to_json())
    return json.loads(info.to_json())


def report_target(args: argparse.Namespace, record: dict[str, Any]) -> str:
    return str(args.out)
