"""The models layer's atomic writes: a reader sees the old file/folder or the new one, never half."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vbatch.models import fileio
from vbatch.models.fileio import atomic_write_bytes, replace_dir, staging_dir


def test_atomic_write_bytes_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "model.onnx"
    atomic_write_bytes(target, b"old")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_written_with_the_permissions_of_a_plain_write(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a", b"x")
        staged = staging_dir(tmp_path / "d")
    finally:
        os.umask(umask)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o644
    assert staged.stat().st_mode & 0o777 == 0o755


def test_atomic_write_bytes_failure_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "meta.json"
    target.write_bytes(b"old")

    def fail(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(fileio.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]  # temp file removed


def _folder(path: Path, content: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "weights.bin").write_text(content)
    return path


def test_replace_dir_new_and_existing(tmp_path: Path) -> None:
    final = tmp_path / "model"
    replace_dir(_folder(staging_dir(final), "v1"), final)
    assert (final / "weights.bin").read_text() == "v1"
    replace_dir(_folder(staging_dir(final), "v2"), final)
    assert (final / "weights.bin").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # nothing staged or aside left


def test_replace_dir_failure_midway_keeps_the_old_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The staged folder cannot be renamed in: the old folder is put back, whole."""
    final = _folder(tmp_path / "model", "old")
    staged = _folder(staging_dir(final), "new")
    real_rename = os.rename

    def rename(src: str | Path, dst: str | Path) -> None:
        if Path(src) == staged:
            raise OSError("rename failed")
        real_rename(src, dst)

    monkeypatch.setattr(fileio.os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        replace_dir(staged, final)
    assert (final / "weights.bin").read_text() == "old"
    assert (staged / "weights.bin").read_text() == "new"  # the caller may retry or clean it up


def test_replace_dir_never_deletes_before_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The old folder is only deleted once the new one is in place (shop-seg's old helper deleted
    it first, so a failed rename lost both)."""
    final = _folder(tmp_path / "model", "old")
    staged = _folder(staging_dir(final), "new")
    events: list[str] = []
    real_rename, real_rmtree = os.rename, fileio.shutil.rmtree

    def rename(src: str | Path, dst: str | Path) -> None:
        events.append(f"rename {Path(src).name} -> {Path(dst).name}")
        real_rename(src, dst)

    def rmtree(path: str | Path, **kwargs: object) -> None:
        events.append("rmtree")
        assert (final / "weights.bin").read_text() == "new"
        real_rmtree(path, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(fileio.os, "rename", rename)
    monkeypatch.setattr(fileio.shutil, "rmtree", rmtree)
    replace_dir(staged, final)
    assert events[-1] == "rmtree" and events[1].endswith("-> model")


def test_shop_seg_writer_replaces_a_directory_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure while writing a new model directory leaves the old one as it was."""
    from vbatch.models.shop_seg import TINY, modeldir

    final = _folder(tmp_path / "shop-seg", "old")

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("interrupted")

    monkeypatch.setattr(modeldir.torch, "save", fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        modeldir.write_random_model_dir(final, TINY)
    assert (final / "weights.bin").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shop-seg"]
