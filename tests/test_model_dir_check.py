"""A broken model directory fails on the driver, at once, and a failed job reads as one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vbatch.jobs.failure import describe_failure
from vbatch.jobs.runtime import ClusterConnectError
from vbatch.models import CheckpointError, check_model_dir
from vbatch.models.checkpoint import peek_state_dict


def test_empty_folder_is_not_taken_for_a_model(tmp_path: Path) -> None:
    with pytest.raises(
        CheckpointError,
        match=r"not a salient model directory .*missing pytorch_model\.pt; it holds nothing",
    ):
        check_model_dir("salient", tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(
        CheckpointError,
        match=r"missing bpe_simple_vocab_16e6\.txt\.gz; it holds pytorch_model\.bin",
    ):
        check_model_dir("shop-seg", tmp_path)


def test_unreadable_checkpoints_are_named(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.pt"
    path.write_bytes(b"not a torch archive")
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*pytorch_model\.pt"):
        check_model_dir("salient", tmp_path)
    torch.save({"a": torch.zeros(3), "b": torch.ones(2, 2)}, path)
    full = path.read_bytes()
    path.write_bytes(full[: len(full) // 2])  # truncated upload
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        check_model_dir("salient", tmp_path)
    torch.save({"a": torch.zeros(3), "b": torch.ones(2, 2)}, path)
    assert peek_state_dict(path) == 2
    check_model_dir("salient", tmp_path)  # opens: the keys are the actors' strict loader's job

    class Payload:  # a pickle that would run code is refused, never executed
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"a": Payload()}, path)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        peek_state_dict(path)


class RayTaskError(RuntimeError):  # Ray's wrapper, by name
    def __init__(self, text: str, cause: BaseException | None = None) -> None:
        super().__init__(text)
        self.cause = cause


def test_describe_failure_digs_out_the_cause() -> None:
    cause = CheckpointError(
        "checkpoint /m/pytorch_model.pt does not fit SENet:\n  missing keys (1): x"
    )
    wrapped = RayTaskError("\x1b[36mray::MapWorker\x1b[0m Traceback …", cause)
    assert describe_failure(wrapped) == (
        "CheckpointError: checkpoint /m/pytorch_model.pt does not fit SENet:"
    )
    text = (
        "\x1b[31mThe actor died because of an error raised in its creation task, ray::_MapWorker.__init__()\n"
        'Traceback (most recent call last):\n  File "x.py", line 3, in f\n'
        "vbatch.models.checkpoint.CheckpointError: checkpoint not found: /m/pytorch_model.pt\x1b[0m"
    )

    class ActorDiedError(Exception):
        pass

    assert describe_failure(ActorDiedError(text)) == (
        "CheckpointError: checkpoint not found: /m/pytorch_model.pt"
    )
    assert describe_failure(ValueError("bad --batch-size")) == "ValueError: bad --batch-size"


def test_cluster_connect_error_says_what_to_do(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("t")
    msg = str(
        ClusterConnectError("10.0.0.1:6379", ConnectionError("Failed to connect to Ray cluster"))
    )
    assert msg.startswith("cannot join the Ray cluster at 10.0.0.1:6379: Failed to connect")
    assert "set RAY_AUTH_MODE=token" in msg
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert "RAY_AUTH_MODE" not in str(ClusterConnectError("a:1", ConnectionError("refused")))
