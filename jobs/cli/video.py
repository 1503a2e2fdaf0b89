"""``vbatch video``: referring video object segmentation (MTTR) over a video manifest."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from vbatch.jobs.cli import options
from vbatch.jobs.cli.segment import add_manifest_job

NAME = "video"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = options.add_job_parser(
        sub,
        NAME,
        help="referring video object segmentation (MTTR): masks per video, query and frame",
        description=(
            "Segment the objects that text queries refer to in every frame of the videos of a Parquet "
            "manifest (video_id, uri, queries: list<string>, optional start_s/end_s), streamed window by "
            "window. Writes <out>/frames/<video_id>/<query_index>/<frame_index>.png and "
            "<out>/results/ (a committed table, see README) with one row per (video, query, frame) and "
            "error rows (a bad video, or a query longer than the text encoder's 512 tokens, fails "
            "alone). Rerunning the same command after a crash resumes it: the windows whose result "
            "rows the crashed run had staged are not decoded or inferred again (see README, Resume)."
        ),
    )
    p.set_defaults(command_module=sys.modules[__name__])
    add_manifest_job(p)
    p.add_argument(
        "--render",
        action="store_true",
        help="also write <out>/renders/<video_id>.mp4 overlays (query texts drawn in ASCII: "
        "emoji as [their name])",
    )
    options.add_precision(p, ("rvos",))
    options.add_row_job(
        p, batch_help="windows (of the model's window_size frames) per model call (default 1)"
    )
    options.add_report_option(p)
    return p


def config(args: argparse.Namespace) -> Any:  # -> VideoConfig
    from vbatch.jobs.video import VideoConfig

    return VideoConfig(render=args.render, precision=args.precision, **options.job_arguments(args))


def run(args: argparse.Namespace, clock: Any) -> dict[str, Any]:
    from vbatch.jobs.video import run_video

    video = run_video(config(args), clock)
    print(video.report())
    return video.record
