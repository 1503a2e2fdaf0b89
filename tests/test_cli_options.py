"""Command-line details: no abbreviations, the storage retry budget reaches StorageOptions."""

from __future__ import annotations

import pytest

from vbatch.jobs.cli import build_parser
from vbatch.operators.storage import DEFAULT_RETRY_SECONDS, StorageOptions

SEGMENT = ["segment", "--task", "salient", "--manifest", "m.parquet", "--out", "o"]


def test_abbreviated_options_are_refused(capsys) -> None:
    with pytest.raises(SystemExit) as e:  # used to mean --model-dir silently
        build_parser().parse_args([*SEGMENT, "--model", "d"])
    assert e.value.code == 2
    assert "--model" in capsys.readouterr().err
    args = build_parser().parse_args([*SEGMENT, "--model-dir", "d"])
    assert args.model_dir == "d"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["reid", "search", "--index", "i", "--emb", "e"])


def test_io_retry_seconds_default_and_override(monkeypatch) -> None:
    monkeypatch.delenv("VBATCH_IO_RETRY_SECONDS", raising=False)
    assert StorageOptions().retry_seconds == DEFAULT_RETRY_SECONDS
    args = build_parser().parse_args([*SEGMENT, "--model-dir", "d", "--io-retry-seconds", "7.5"])
    assert args.io_retry_seconds == 7.5
    monkeypatch.setenv("VBATCH_IO_RETRY_SECONDS", "7.5")
    assert StorageOptions().retry_seconds == 7.5
