"""``vbatch reid eval``: mAP and CMC of query embeddings against a gallery (Market-1501)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from vbatch.jobs.cli import options
from vbatch.jobs.cli.command import storage_of

NAME = "reid eval"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "eval",
        help="mAP and CMC (Market-1501 protocol)",
        description=(
            "mAP and CMC rank-1/5/10 of query embeddings against gallery embeddings; both tables need "
            "embedding, person_id (integers or strings of integers such as '0002') and camera_id; a status "
            "column is optional (rows not 'ok' are ignored). Same-identity same-camera gallery images are "
            "excluded per query; identity -1 is junk, 0 a distractor. Tables of different model_version, "
            "and ok rows with an invalid embedding, are refused."
        ),
    )
    p.set_defaults(command_module=sys.modules[__name__])
    p.add_argument("--query", required=True, metavar="URI")
    p.add_argument("--gallery", required=True, metavar="URI")
    p.add_argument(
        "--json", action="store_true", help="print the metrics as one JSON object on stdout"
    )
    p.add_argument(
        "--allow-model-mismatch",
        action="store_true",
        help="score even if query and gallery model_version differ",
    )
    options.add_common(p)
    options.add_run_arguments(p, rows=False)
    return p


def config(args: argparse.Namespace) -> dict[str, Any]:
    return {"allow_model_mismatch": args.allow_model_mismatch}


def run(args: argparse.Namespace, clock: Any) -> dict[str, Any]:
    from vbatch.operators.reid_eval import evaluate, read_embeddings

    storage = storage_of(args)
    result = evaluate(
        read_embeddings(args.query, storage),  # errors name the file and its row
        read_embeddings(args.gallery, storage),
        **config(args),
    )
    # NaN (no query could be evaluated) is not JSON: null
    metrics = {
        k: (None if isinstance(v, float) and math.isnan(v) else v)
        for k, v in result.items()
        if k != "cmc"
    } | {"cmc": [None if math.isnan(v) else v for v in result["cmc"]]}
    if args.json:
        print(json.dumps(metrics))
        return metrics
    print(
        f"queries: {result['num_valid_query']} evaluated of {result['num_query']}\n"
        f"mAP     : {result['mAP']:.6f}\n"
        + "\n".join(f"{k:<8}: {result[k]:.6f}" for k in ("cmc@1", "cmc@5", "cmc@10") if k in result)
    )
    return {k: v for k, v in metrics.items() if k != "cmc"}
