"""The CLI's arguments reach the jobs' configurations (no job runs here)."""

from __future__ import annotations

from vbatch.jobs.cli import _image_job_config, _job_arguments, build_parser
from vbatch.jobs.video import VideoConfig


def test_video_and_segment_arguments_reach_their_configs() -> None:
    common = ["--manifest", "m.parquet", "--model-dir", "s3://models/x", "--out", "o"]
    pool = ["--batch-size", "3", "--actors", "2", "--threads-per-actor", "4", "--limit", "9"]
    s3 = ["--s3-endpoint", "http://127.0.0.1:9000"]
    args = build_parser().parse_args(["video", *common, *pool, *s3, "--render"])
    video = VideoConfig(render=args.render, precision=args.precision, **_job_arguments(args))
    assert (video.manifest, video.model_dir, video.out) == ("m.parquet", "s3://models/x", "o")
    assert (video.batch_size, video.actors, video.threads_per_actor, video.limit) == (3, 2, 4, 9)
    assert (
        video.s3_endpoint == "http://127.0.0.1:9000"
        and video.render
        and video.gpus_per_actor is None
    )

    args = build_parser().parse_args(
        ["segment", "--task", "matting", *common, *pool, "--max-side", "800"]
    )
    seg = _image_job_config(args, args.task)
    assert (seg.task, seg.batch_size, seg.actors, seg.limit, seg.max_side) == (
        "matting",
        3,
        2,
        9,
        800,
    )

    args = build_parser().parse_args(["reid", "embed", *common])
    emb = _image_job_config(args, "reid")
    assert emb.task == "reid" and emb.batch_size is None and emb.max_pixels == seg.max_pixels
