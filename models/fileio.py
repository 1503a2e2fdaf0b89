"""Atomic writes for the models layer: a reader sees the old file or folder or the new one, never half.

Files are written under a temporary name in the same folder, flushed to disk and moved over the
target with :func:`os.replace` (atomic on POSIX within one file system; faiss ``contrib/ondisk.py``
checkpoints the same way). Folders cannot be replaced atomically over an existing one, so
:func:`replace_dir` renames the old folder aside first, renames the new one in, and only then
deletes the old one: a failure at any step leaves a complete folder at or beside the target.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_path(path: str | Path, durable: bool = False) -> Iterator[Path]:
    """A temporary name next to ``path`` to write to; moved over ``path`` when the block succeeds.

    The one temp-then-rename of vbatch: files written by the models layer, the storage layer's
    local writes and downloads, and the node caches all go through it.

    Args:
        path: the file to create or replace; its folder must exist.
        durable: ``fsync`` the file before the rename (a model file a later run trusts); not for
            per-image products, whose atomic visibility is what matters and which a rerun rewrites.

    Yields:
        The temporary path; the block writes the whole file there. On an error it is removed and
        ``path`` is left as it was.
    """
    path = Path(path)
    tmp = _sibling(path)
    try:
        yield tmp
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_write_bytes(path: str | Path, data: bytes, durable: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`).

    Args:
        path: the file to create or replace; its folder must exist.
        data: the whole content.
        durable: ``fsync`` before the rename.

    Returns:
        ``path`` as a :class:`Path`.
    """
    path = Path(path)
    with atomic_path(path, durable) as tmp:
        # os.open with 0o666, not mkstemp (0o600): the file gets the permissions a plain write would
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    return path


def replace_dir(staged: str | Path, final: str | Path) -> Path:
    """Move the complete folder ``staged`` to ``final``, replacing any folder there.

    The old ``final`` is renamed aside (``.<name>.old-<random>`` next to it) before ``staged`` is
    renamed in, and deleted only after that: if the second rename fails the old folder is put back,
    so ``final`` is never left missing or half-written. ``staged`` must be on the same file system
    as ``final`` (create it next to it).

    Args:
        staged: the new folder, fully written.
        final: where it goes.

    Returns:
        ``final`` as a :class:`Path`.
    """
    staged, final = Path(staged), Path(final)
    aside: Path | None = None
    if final.exists():
        aside = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(final, aside)
    try:
        os.rename(staged, final)
    except BaseException:
        if aside is not None:
            os.rename(aside, final)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return final


def staging_dir(final: str | Path) -> Path:
    """A fresh empty folder next to ``final`` to write a new version of it into (see :func:`replace_dir`)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staged = _sibling(final)
    staged.mkdir()  # not mkdtemp (0o700): the folder gets the permissions a plain mkdir would
    return staged


def _sibling(path: Path) -> Path:
    """A hidden, unique name next to ``path`` (same folder, so same file system as ``path``)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
