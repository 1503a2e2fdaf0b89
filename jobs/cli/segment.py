"""``vbatch segment``: one mask (or matte) per image of a Parquet manifest."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from vbatch.jobs.cli import options
from vbatch.jobs.cli.command import logger
from vbatch.models.registry import REGISTRY
from vbatch.operators.defaults import DECODE_MODES, DEFAULT_MAX_PIXELS

NAME = "segment"
#: what --task offers: the models whose products are images
TASKS = [name for name, entry in REGISTRY.items() if entry.is_image_task]


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    tasks = ", ".join(f"{k} ({REGISTRY[k].summary})" for k in TASKS)
    p = options.add_job_parser(
        sub,
        NAME,
        help="one mask per image of a Parquet manifest",
        description=(
            "Run a segmentation model over an image manifest (Parquet: image_id, uri, any other columns "
            "pass through). Writes <out>/masks/<image_id>.png and <out>/results/ (a committed table: "
            "<out>/_LATEST names the generation folder results/<run id> holding its Parquet files) with one row per "
            f"manifest row (status ok|error, error_class). Tasks: {tasks}. A gt_mask_uri column "
            "(ground-truth masks) adds per-image quality metrics (gt_* columns; gt_error when a "
            "ground truth cannot be used). Ends by writing <out>/report/index.html."
        ),
    )
    p.set_defaults(command_module=sys.modules[__name__])
    p.add_argument("--task", required=True, choices=TASKS)
    add_manifest_job(p)
    p.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help=f"refuse images with more pixels (decompression bombs; default {DEFAULT_MAX_PIXELS:,}, Pillow's limit)",
    )
    g = p.add_argument_group("model options")
    options.add_precision(g, tuple(TASKS))
    g.add_argument(
        "--max-side",
        type=int,
        default=2000,
        metavar="PX",
        help="matting: longer images run downscaled to this long side, mattes come back at full size (default 2000)",
    )
    g.add_argument(
        "--background",
        metavar="COLOR|URI",
        help="matting: also write <out>/composites/<id>.jpg over this colour (#RRGGBB or r,g,b) or image",
    )
    g.add_argument(
        "--decode",
        choices=list(DECODE_MODES),
        default="exact",
        help="exact (default): the reference preprocessing, bit for bit; fast: JPEGs decoded at a reduced DCT scale, then the model's resize (approximate, a fraction of the CPU); gpu: JPEGs decoded and resized in the model actor, on its GPU (nvJPEG; on its CPU when it has none), within 1 grey level of exact on the CPU",
    )
    g.add_argument(
        "--mask-size",
        choices=["full", "model"],
        default="full",
        help="salient/shop-seg: full (default) writes masks at the image's size; model at the network's resolution (width/height in the results stay the original's)",
    )
    options.add_reuse(p)
    options.add_row_job(p)
    options.add_report_option(p)
    return p


def add_manifest_job(p: argparse.ArgumentParser) -> None:
    """--manifest, --model-dir, --out, --limit: what every manifest → model → outputs job takes."""
    p.add_argument(
        "--manifest", required=True, metavar="URI", help="Parquet file or folder of Parquet files"
    )
    p.add_argument("--model-dir", required=True, metavar="URI", help="ModelScope model directory")
    p.add_argument("--out", required=True, metavar="URI", help="output folder")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N manifest rows")


def image_job_config(args: argparse.Namespace, task: str) -> Any:  # -> ImageJobConfig
    """The image job's configuration from ``segment`` / ``reid embed`` arguments (options one
    command lacks keep their defaults)."""
    from vbatch.jobs.image_pipeline import ImageJobConfig

    own = ("max_pixels", "max_side", "background", "precision", "decode", "mask_size", "reuse")
    extra = {k: getattr(args, k) for k in own if hasattr(args, k)}
    return ImageJobConfig(task=task, **options.job_arguments(args), **extra)


def config(args: argparse.Namespace) -> Any:  # -> ImageJobConfig
    return image_job_config(args, args.task)


def run(args: argparse.Namespace, clock: Any) -> dict[str, Any]:
    from vbatch.jobs.segment import run_image_job

    summary = run_image_job(config(args), clock)
    print(summary.report())
    return summary.record


def run_shared(
    command: str, cfgs: list[Any], clocks: list[Any], verbose: bool = False
) -> list[dict[str, Any]]:
    """Image jobs of one model through one pipeline and actor pool (``vbatch backfill``); prints
    each one's report and returns each one's summary, in order.

    Raises:
        vbatch.jobs.segment.PoolMismatch: the jobs cannot share one pool.
    """
    from vbatch.jobs.failure import describe_failure
    from vbatch.jobs.segment import PoolMismatch, run_image_jobs
    from vbatch.jobs.summary import JobFailed, failed_record

    try:
        results: list[Any] = run_image_jobs(cfgs, clocks, command)
    except PoolMismatch:
        raise
    except Exception as e:  # the shared pipeline failed: every job failed (staged rows stay)
        if verbose:
            logger.exception("failed")
        results = [e] * len(cfgs)
    records = []
    for cfg, clock, result in zip(cfgs, clocks, results, strict=True):
        if isinstance(result, Exception):
            print(
                f"vbatch {command} ({cfg.out}): error: {describe_failure(result)}", file=sys.stderr
            )
            partial = result.record if isinstance(result, JobFailed) else None
            records.append(failed_record(command, clock, result, partial))
        else:
            print(result.report())
            records.append(result.record)
    return records
