"""``vbatch reid embed``: L2-normalised embeddings for every row of an image manifest."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from vbatch.jobs.cli import options
from vbatch.jobs.cli.segment import add_manifest_job, image_job_config

NAME = "reid embed"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "embed",
        help="L2-normalised 1536-d embeddings for every row of an image manifest",
        description=(
            "Writes <out>/results/*.parquet: image_id, status, error, embedding (1536 float32, L2-normalised), "
            "model_version and your columns (e.g. person_id, camera_id), one row per manifest row."
        ),
    )
    p.set_defaults(command_module=sys.modules[__name__])
    add_manifest_job(p)
    options.add_precision(p, ("reid",))
    options.add_reuse(p)
    options.add_row_job(p)
    options.add_report_option(p)
    return p


def config(args: argparse.Namespace) -> Any:  # -> ImageJobConfig
    return image_job_config(args, "reid")


def run(args: argparse.Namespace, clock: Any) -> dict[str, Any]:
    from vbatch.jobs.reid import run_embed

    summary = run_embed(config(args), clock)
    print(summary.report())
    return summary.record
