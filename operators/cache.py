"""Node-local caches of remote objects: model directories and videos, under ``$VBATCH_CACHE``.

Every actor needs its model directory as local files, and decord seeks in a file, so objects on S3
are downloaded once per node and reused by every task there:

- ``<cache>/model-dirs/<stamp>/``: one folder per model directory version (URI + keys, sizes, ETags);
- ``<cache>/videos/<stamp><suffix>``: one file per video version, bounded (LRU, see
  :func:`evict_videos`).

A download never writes outside its cache folder: an object key whose segments could (``..``,
``.``, empty, absolute) is refused with :class:`UnsafeKeyError` before anything is written; on S3
such keys are legal, and ``key/../../x`` joined onto a folder would land anywhere the process may
write (a ``.pth`` file in site-packages runs at interpreter start-up).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from vbatch.models.fileio import atomic_path
from vbatch.operators.storage import Storage, is_http, is_remote, normalize, with_retries

logger = logging.getLogger(__name__)

#: default bound of the per-node video cache (``VBATCH_VIDEO_CACHE_GB`` overrides it)
VIDEO_CACHE_GB = 20.0
#: a cached video used this recently is never evicted: a task may be between finding it and
#: opening it (an open file stays readable after an unlink, a path that was just returned does not)
EVICTION_GRACE_S = 600.0


class UnsafeKeyError(ValueError):
    """An object key that would place a download outside its local folder."""


def cache_root() -> Path:
    """``$VBATCH_CACHE``, else ``~/.cache/vbatch``."""
    return Path(os.environ.get("VBATCH_CACHE") or Path.home() / ".cache" / "vbatch")


def check_key(key: str, what: str) -> None:
    """Refuse a key (or the part of one below a folder) that is unsafe as a relative local path.

    Args:
        key: ``a/b/c.ext``, relative to the folder it is downloaded into.
        what: names the download in the message, e.g. ``"model directory s3://b/m"``.

    Raises:
        UnsafeKeyError: absolute, or with a ``..``, ``.`` or empty segment (names the key).
    """
    if key.startswith("/"):
        problem = "an absolute path"
    elif any(s == ".." for s in key.split("/")):
        problem = "a '..' segment"
    elif any(s == "." for s in key.split("/")):
        problem = "a '.' segment"
    elif any(s == "" for s in key.split("/")):
        problem = "an empty segment (a doubled, leading or trailing '/')"
    elif "\x00" in key:
        problem = "a NUL byte"
    else:
        return
    raise UnsafeKeyError(f"{what}: refusing object key {key!r}: it has {problem}")


def _relative_key(key: str, root: str, what: str) -> str:
    """``key`` below the listed folder ``root`` (``bucket/prefix``), checked by :func:`check_key`."""
    prefix = root.rstrip("/") + "/"
    if not key.startswith(prefix):
        raise UnsafeKeyError(f"{what}: refusing object key {key!r}: it is not under {prefix!r}")
    rel = key[len(prefix) :]
    check_key(rel, what)
    return rel


def _inside(folder: Path, rel: str) -> Path:
    """``folder / rel``, asserting that it stays inside ``folder`` (after :func:`check_key`, a
    second line of defence against whatever the first did not think of)."""
    target = (folder / rel).resolve()
    if not target.is_relative_to(folder.resolve()):
        raise UnsafeKeyError(f"refusing to write {target}: outside {folder}")
    return target


# -- model directories ------------------------------------------------------------------------------
def localize_dir(storage: Storage, uri: str, root: str | Path | None = None) -> Path:
    """A local folder with the contents of ``uri``: itself when local, else a cached download.

    Model directories live on object storage; every actor needs them as local files. The cache
    key is the URI plus the objects' keys, sizes and ETags, so an updated model directory is fetched
    again while a repeated run on the same node downloads nothing.

    Args:
        storage: reaches ``uri``.
        uri: a local folder, ``file://`` or ``s3://`` prefix.
        root: the cache (default :func:`cache_root`); the folder goes to ``<root>/model-dirs``.

    Returns:
        The local folder.

    Raises:
        FileNotFoundError: no such folder (or no object under the prefix).
        UnsafeKeyError: an object key that would leave the folder (nothing is downloaded then).
    """
    if not is_remote(uri):
        path = Path(normalize(uri))
        if not path.is_dir():
            raise FileNotFoundError(f"model directory not found: {uri}")
        return path
    fs, prefix = storage.fs(uri)
    budget = storage.options.retry_seconds
    listing = with_retries(lambda: fs.find(prefix, detail=True), f"list {uri}", budget)
    entries = {
        k: v
        for k, v in listing.items()
        # folder markers (``sub/``, 0 bytes) that some tools create hold nothing to download
        if not (v.get("type") == "directory" or (k.endswith("/") and not v.get("size")))
    }
    if not entries:
        raise FileNotFoundError(f"model directory not found or empty: {uri}")
    # every key is checked before the first byte is written
    rels = {key: _relative_key(key, prefix, f"model directory {uri}") for key in entries}
    stamp = hashlib.sha256(
        repr(sorted((k, v.get("size"), v.get("ETag")) for k, v in entries.items())).encode()
    ).hexdigest()[:16]
    folder = Path(root or cache_root()) / "model-dirs"
    target = folder / stamp
    if target.is_dir():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    # same folder as the target, so the final os.replace is a rename on one filesystem
    tmp = Path(tempfile.mkdtemp(prefix=f".{stamp}.", dir=folder))
    try:
        for key, rel in rels.items():
            local = _inside(tmp, rel)
            local.parent.mkdir(parents=True, exist_ok=True)
            get = functools.partial(fs.get_file, key, str(local))
            with_retries(get, f"download {key}", budget)
        os.replace(tmp, target)
    except OSError:
        if not target.is_dir():  # a failed download, not a lost race
            raise
        # another actor on this node finished first: use theirs
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("model directory %s cached at %s", uri, target)
    return target


# -- videos -----------------------------------------------------------------------------------------
def _video_cache_limit() -> int:
    value = os.environ.get("VBATCH_VIDEO_CACHE_GB")
    try:
        gb = VIDEO_CACHE_GB if value is None else float(value)
    except ValueError:
        raise ValueError(f"VBATCH_VIDEO_CACHE_GB={value!r} is not a number of GB") from None
    return int(gb * 1e9)


def evict_videos(root: Path, max_bytes: int, grace_s: float | None = None) -> list[Path]:
    """Delete the least recently used cached videos until ``root`` holds at most ``max_bytes``.

    Use time is the file's mtime (:func:`localize_video` touches it on every hit). Files used
    within ``grace_s`` seconds (default :data:`EVICTION_GRACE_S`) and unfinished downloads (dot
    files) are kept even when that leaves the cache over its bound for a while. Safe with concurrent
    tasks: a file another task deleted first is skipped.

    Returns:
        The files deleted.
    """
    entries = []
    for path in root.iterdir() if root.is_dir() else ():
        if path.name.startswith("."):
            continue
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        entries.append((st.st_mtime, st.st_size, path))
    total = sum(size for _, size, _ in entries)
    deleted: list[Path] = []
    now = time.time()
    grace_s = EVICTION_GRACE_S if grace_s is None else grace_s
    for mtime, size, path in sorted(entries, key=lambda e: e[0]):
        if total <= max_bytes or now - mtime < grace_s:
            break
        try:
            path.unlink()
            deleted.append(path)
        except FileNotFoundError:
            pass
        total -= size
    if deleted:
        logger.info("video cache %s: evicted %d least recently used file(s)", root, len(deleted))
    return deleted


def localize_video(storage: Storage, uri: str) -> str:
    """A local file with the video at ``uri``: the file itself when local, else a cached download.

    The cache key is the URI, size and ETag, so every window of a video on one node reuses one
    download and a changed object is fetched again. Downloads stream to disk (no copy in memory).
    The cache is bounded (``VBATCH_VIDEO_CACHE_GB``, default 20): after each download the least
    recently used videos are evicted (:func:`evict_videos`).

    Raises:
        FileNotFoundError, IsADirectoryError: no such object, or a folder.
        UnsafeKeyError: a key with ``..``, ``.`` or empty segments (refused like model directories').
    """
    if not (is_remote(uri) or is_http(uri)):
        path = normalize(uri)
        if os.path.isdir(path):
            raise IsADirectoryError(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(path)
        return path
    fs, path = storage.fs(uri)
    budget = storage.options.retry_seconds
    info = storage.info(uri)  # FileNotFoundError only for a missing object, retries the rest
    if info.get("type") == "directory":
        raise IsADirectoryError(uri)
    if is_remote(uri):
        # the cached name is a hash, so no key can leave the cache; such keys are refused anyway,
        # by the same rule as everywhere else (they are almost certainly a mistake or an attack)
        check_key(path.split("/", 1)[1] if "/" in path else "", f"video {uri}")
    stamp = hashlib.sha256(repr((uri, info.get("size"), info.get("ETag"))).encode()).hexdigest()
    root = cache_root() / "videos"
    target = root / (stamp[:24] + Path(path).suffix[:8])
    try:
        os.utime(target)  # a hit: mark it recently used
        return str(target)
    except FileNotFoundError:
        pass
    root.mkdir(parents=True, exist_ok=True)
    # another task may have finished first: same content, replaced atomically
    with atomic_path(target) as tmp:
        with_retries(functools.partial(fs.get_file, path, str(tmp)), f"download {uri}", budget)
    evict_videos(root, _video_cache_limit())
    return str(target)
