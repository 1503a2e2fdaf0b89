"""The CLI's arguments reach the jobs' configurations; exit codes and the run summary (no job
runs here: the jobs are stand-ins)."""

from __future__ import annotations

import dataclasses
import json

import pyarrow as pa
import pytest

from vbatch.jobs.cli import build_parser, main
from vbatch.jobs.cli import video as video_command
from vbatch.jobs.cli.options import job_arguments
from vbatch.jobs.cli.segment import image_job_config
from vbatch.jobs.image_pipeline import task_options
from vbatch.jobs.runtime import Resources
from vbatch.jobs.segment import ImageJobConfig
from vbatch.jobs.summary import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_TOO_MANY_ERRORS,
    JobFailed,
    Limits,
    RunClock,
    check_infrastructure,
    count_rows,
    job_record,
    run_command,
)
from vbatch.jobs.video import VideoConfig
from vbatch.models import model_entry


def test_video_and_segment_arguments_reach_their_configs() -> None:
    common = ["--manifest", "m.parquet", "--model-dir", "s3://models/x", "--out", "o"]
    pool = ["--batch-size", "3", "--actors", "2", "--threads-per-actor", "4", "--limit", "9"]
    s3 = ["--s3-endpoint", "http://127.0.0.1:9000"]
    args = build_parser().parse_args(["video", *common, *pool, *s3, "--render"])
    video = video_command.config(args)
    assert isinstance(video, VideoConfig)
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
    seg = image_job_config(args, args.task)
    assert (seg.task, seg.batch_size, seg.actors, seg.limit, seg.max_side) == (
        "matting",
        3,
        2,
        9,
        800,
    )

    args = build_parser().parse_args(["reid", "embed", *common])
    emb = image_job_config(args, "reid")
    assert emb.task == "reid" and emb.batch_size is None and emb.max_pixels == seg.max_pixels


# -- exit codes and the summary (no job runs: the job functions are stand-ins) ---------------------

JOB_COMMANDS = [
    ["segment", "--task", "salient"],
    ["video"],
    ["reid", "embed"],
]
OTHER_COMMANDS = [["reid", "index"], ["reid", "add"], ["reid", "search"], ["reid", "eval"]]


def _results(ok: int, errors: list[str]) -> pa.Table:
    messages = [None] * ok + errors
    return pa.table(
        {
            "image_id": [f"i{k}" for k in range(len(messages))],
            "status": ["ok"] * ok + ["error"] * len(errors),
            "error": pa.array(messages, pa.string()),
        }
    )


def test_counts_by_status_and_error_class_with_samples() -> None:
    errors = [
        "object not found: s3://b/x.jpg",
        "corrupt or truncated image: broken data stream",
        "cannot read s3://b/y.jpg: OSError: storage unavailable after 5 retries: SlowDown",
        "manifest row 7: image_id is null",
        "inference failed: RuntimeError: boom",
        "postprocess/write failed: OSError: disk full",
        "something new",
    ]
    counts = count_rows(_results(93, errors), "image_id")
    assert counts.rows == 100 and counts.by_status == {"ok": 93, "error": 7}
    assert counts.by_error_class == {
        "not_found": 1,
        "decode": 1,
        "infrastructure": 1,
        "manifest": 1,
        "model": 1,
        "write": 1,
        "other": 1,
    }
    assert counts.sample_errors == [(f"i{93 + k}", e) for k, e in enumerate(errors[:5])]


@pytest.mark.parametrize(
    ("errors", "limits", "exit_code"),
    [
        (1, Limits(), EXIT_OK),  # 1 % is allowed
        (2, Limits(), EXIT_TOO_MANY_ERRORS),
        (2, Limits(max_error_rate=0.02), EXIT_OK),
        (0, Limits(max_error_rate=0.0), EXIT_OK),
    ],
)
def test_exit_code_follows_the_error_rate(errors: int, limits: Limits, exit_code: int) -> None:
    counts = count_rows(_results(100 - errors, ["object not found: x"] * errors), "image_id")
    record = job_record("segment", RunClock(), counts, limits, task="salient")
    assert record["exit_code"] == exit_code and record["error_rate"] == errors / 100
    assert record["status"] == {0: "ok", 3: "too_many_errors"}[exit_code]
    for key in ("run_id", "started_at", "ended_at", "seconds", "by_error_class", "versions"):
        assert key in record
    assert {"vbatch", "torch", "ray"} <= set(record["versions"])
    json.dumps(record)  # serialisable as it is


def test_infrastructure_errors_over_the_limit_fail_the_job() -> None:
    infra = "storage unavailable after 5 retries: EndpointConnectionError"
    check_infrastructure(count_rows(_results(99, [infra]), "image_id"), Limits())
    with pytest.raises(JobFailed, match="2 of 100 images hit infrastructure errors") as e:
        check_infrastructure(count_rows(_results(98, [infra] * 2), "image_id"), Limits(), "images")
    assert e.value.record["by_error_class"] == {"infrastructure": 2}
    # data errors never count against the infrastructure limit
    check_infrastructure(
        count_rows(_results(50, ["object not found: x"] * 50), "image_id"), Limits()
    )


def _args(tmp_path, target: str | None) -> object:
    return build_parser().parse_args(
        ["reid", "index", "--embeddings", "e", "--out", "o"]
        + (["--summary-json", target] if target else [])
    )


def test_run_command_exit_codes_and_summary_json(tmp_path, capsys) -> None:
    path = tmp_path / "summary.json"
    args = _args(tmp_path, str(path))
    assert run_command("reid index", args, lambda clock: {"count": 12}) == EXIT_OK
    record = json.loads(path.read_text())
    assert record["exit_code"] == 0 and record["count"] == 12 and record["command"] == "reid index"

    def too_many(clock: RunClock) -> dict:
        counts = count_rows(_results(5, ["object not found: x"] * 5), "image_id")
        return job_record("segment", clock, counts, Limits())

    assert run_command("segment", args, too_many) == EXIT_TOO_MANY_ERRORS
    record = json.loads(path.read_text())
    assert record["status"] == "too_many_errors" and record["by_error_class"] == {"not_found": 5}

    def fails(clock: RunClock) -> dict:
        raise JobFailed("store down", record={"rows": 4, "by_error_class": {"infrastructure": 4}})

    assert run_command("segment", args, fails) == EXIT_FAILED
    record = json.loads(path.read_text())
    assert record["status"] == "failed" and record["error"] == "JobFailed: store down"
    assert record["by_error_class"] == {"infrastructure": 4}
    assert "vbatch segment: error: store down" in capsys.readouterr().err

    def crashes(clock: RunClock) -> dict:
        raise FileNotFoundError("no such model directory")

    assert run_command("reid index", _args(tmp_path, "-"), crashes) == EXIT_FAILED
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last)["error"] == "FileNotFoundError: no such model directory"


def test_every_job_command_has_the_summary_options() -> None:
    required = {
        "segment": ["--manifest", "m", "--model-dir", "d", "--out", "o"],
        "video": ["--manifest", "m", "--model-dir", "d", "--out", "o"],
        "embed": ["--manifest", "m", "--model-dir", "d", "--out", "o"],
        "index": ["--embeddings", "e", "--out", "o"],
        "add": ["--index", "i", "--embeddings", "e"],
        "search": ["--index", "i", "--embeddings", "e"],
        "eval": ["--query", "q", "--gallery", "g"],
    }

    def base(command: list[str]) -> list[str]:
        return [*command, *required[command[-1] if command[0] == "reid" else command[0]]]

    for command in JOB_COMMANDS + OTHER_COMMANDS:
        args = build_parser().parse_args([*base(command), "--summary-json", "-"])
        assert args.summary_json == "-"
    for command in JOB_COMMANDS:
        limits = ["--max-error-rate", "0.2", "--max-infra-error-rate", "0.05"]
        args = build_parser().parse_args([*base(command), *limits])
        assert (args.max_error_rate, args.max_infra_error_rate) == (0.2, 0.05)
        assert job_arguments(args)["max_error_rate"] == 0.2


def test_usage_errors_exit_2(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["segment", "--task", "salient"])  # missing --manifest …
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["segment", "--task", "salient", "--max-error-rate", "lots"])
    assert e.value.code == 2


def test_task_options_come_from_the_registry() -> None:
    res = Resources(batch_size=2, actors=1, gpus_per_actor=0.0, threads=3, device="cpu", memory=0)
    cfg = ImageJobConfig("matting", "m", "d", "o", max_side=800, precision="bf16")
    assert task_options(model_entry("matting"), cfg, res) == (
        {"threads": 3, "max_side": 800},
        {"max_side": 800},
    )
    shop = dataclasses.replace(cfg, task="shop-seg")
    assert task_options(model_entry("shop-seg"), shop, res) == ({"precision": "bf16"}, {})
    # every torch model takes the job's precision
    assert task_options(model_entry("salient"), cfg, res) == ({"precision": "bf16"}, {})
    assert task_options(model_entry("reid"), cfg, res) == ({"precision": "bf16"}, {})


def test_image_job_config_is_not_mutated_by_reid_embed() -> None:
    cfg = ImageJobConfig("salient", "m", "d", "o")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.task = "reid"  # type: ignore[misc]
