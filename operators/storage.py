"""Every path in vbatch is a URI: a local path, ``file://…`` or ``s3://bucket/key``.

Object storage goes through s3fs (fsspec); Ray Data and pyarrow get the same filesystem wrapped as a
``pyarrow.fs.PyFileSystem``, so the job's own reads/writes and Ray's use one configuration.
Credentials come from the standard AWS environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, profiles, instance roles) as botocore resolves them in each worker; the
endpoint from ``--s3-endpoint`` or ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``.

Writes are atomic: a local file is written under a temporary name and ``os.replace``-d; an S3 object
becomes visible only when its single PUT completes. Names are deterministic, so a repeated run
overwrites instead of duplicating.
"""

from __future__ import annotations

import functools
import logging
import os
import posixpath
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import pyarrow.fs as pafs

logger = logging.getLogger(__name__)

_REMOTE_SCHEMES = ("s3", "s3a")


@dataclass(frozen=True)
class StorageOptions:
    """How to reach object storage; small and picklable, shipped to every Ray task.

    Attributes:
        endpoint_url: S3 endpoint (MinIO, SeaweedFS, …); ``None`` reads ``AWS_ENDPOINT_URL_S3`` or
            ``AWS_ENDPOINT_URL`` and otherwise uses AWS.
        anon: unsigned requests (public buckets).
        extra: more keyword arguments for ``s3fs.S3FileSystem``.
    """

    endpoint_url: str | None = None
    anon: bool = False
    extra: tuple[tuple[str, Any], ...] = field(default_factory=tuple)

    def resolved_endpoint(self) -> str | None:
        return (
            self.endpoint_url
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
            or None
        )


def scheme_of(uri: str) -> str:
    """``"s3"`` for ``s3://…``, ``"file"`` for local paths and ``file://``."""
    if "://" in uri:
        return uri.split("://", 1)[0].lower()
    return "file"


def is_remote(uri: str) -> bool:
    return scheme_of(uri) in _REMOTE_SCHEMES


def _strip(uri: str) -> str:
    """The path part: ``bucket/key`` for S3, an absolute local path otherwise."""
    scheme = scheme_of(uri)
    if scheme in _REMOTE_SCHEMES:
        return uri.split("://", 1)[1]
    if scheme == "file":
        path = uri[len("file://") :] if uri.startswith("file://") else uri
        return os.path.abspath(os.path.expanduser(path))
    raise ValueError(
        f"unsupported URI scheme {scheme!r} in {uri!r} (use a local path, file:// or s3://)"
    )


def normalize(uri: str) -> str:
    """Canonical form: ``s3://bucket/key`` or an absolute local path."""
    path = _strip(uri)
    return f"s3://{path}" if is_remote(uri) else path


def join(base: str, *parts: str) -> str:
    """Join path parts onto a URI with ``/`` (also for local paths on POSIX)."""
    if is_remote(base):
        return "s3://" + posixpath.join(_strip(base), *parts)
    return os.path.join(_strip(base), *parts)


def parent(uri: str) -> str:
    if is_remote(uri):
        return "s3://" + posixpath.dirname(_strip(uri).rstrip("/"))
    return os.path.dirname(_strip(uri).rstrip("/"))


def resolve(uri: str, base: str) -> str:
    """Resolve ``uri`` from a manifest against the manifest's folder ``base`` when it is relative."""
    if "://" in uri or os.path.isabs(uri):
        return normalize(uri)
    return join(base, uri)


@functools.lru_cache(maxsize=8)
def describe_read_error(e: BaseException, uri: str, what: str = "") -> str:
    """The error message of a row whose object at ``uri`` could not be read (``what``: e.g.
    ``"video "`` for "cannot read video …")."""
    if isinstance(e, FileNotFoundError):
        return f"object not found: {uri}"
    if isinstance(e, IsADirectoryError):
        return f"is a folder, not a file: {uri}"
    if isinstance(e, PermissionError):
        return f"access denied reading {uri}: {e}"
    first_line = str(e).splitlines()[0] if str(e) else ""
    return f"cannot read {what}{uri}: {type(e).__name__}: {first_line}"


def _s3(options: StorageOptions) -> fsspec.AbstractFileSystem:
    import s3fs  # imported lazily: local-only runs never need boto

    kwargs: dict[str, Any] = dict(options.extra)
    endpoint = options.resolved_endpoint()
    if endpoint:
        kwargs["endpoint_url"] = endpoint
    # listings change under us (other workers write); never serve a stale directory listing
    return s3fs.S3FileSystem(anon=options.anon, use_listings_cache=False, **kwargs)


class Storage:
    """Reads and writes URIs; picklable (holds only :class:`StorageOptions`)."""

    def __init__(self, options: StorageOptions | None = None) -> None:
        self.options = options or StorageOptions()

    def __reduce__(self) -> tuple[Any, ...]:
        return (Storage, (self.options,))

    # -- filesystems -------------------------------------------------------------------------------
    def fs(self, uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
        """The fsspec filesystem for ``uri`` and the path to pass to it."""
        if is_remote(uri):
            return _s3(self.options), _strip(uri)
        return fsspec.filesystem("file"), _strip(uri)

    def arrow_fs(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """A pyarrow filesystem (for Ray Data and pyarrow readers/writers) and the path for it."""
        if is_remote(uri):
            return pafs.PyFileSystem(pafs.FSSpecHandler(_s3(self.options))), _strip(uri)
        return pafs.LocalFileSystem(), _strip(uri)

    # -- objects -----------------------------------------------------------------------------------
    def read_bytes(self, uri: str) -> bytes:
        """Whole object; ``FileNotFoundError`` when it does not exist."""
        fs, path = self.fs(uri)
        return fs.cat_file(path)

    def size(self, uri: str) -> int:
        fs, path = self.fs(uri)
        return int(fs.size(path))

    def exists(self, uri: str) -> bool:
        fs, path = self.fs(uri)
        return bool(fs.exists(path))

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write an object atomically (readers see the old or the new content, never a part)."""
        fs, path = self.fs(uri)
        if is_remote(uri):
            fs.pipe_file(path, data)
            return
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def makedirs(self, uri: str) -> None:
        """Local folders are created; S3 has no folders (a no-op there)."""
        if not is_remote(uri):
            os.makedirs(_strip(uri), exist_ok=True)

    def list_files(self, uri: str, suffix: str = "") -> list[str]:
        """Files directly or recursively under ``uri`` (sorted URIs), or ``[uri]`` if it is a file."""
        fs, path = self.fs(uri)
        if fs.isfile(path):
            return [normalize(uri)]
        if not fs.exists(path):
            return []
        found = sorted(p for p in fs.find(path) if p.endswith(suffix))
        return [f"s3://{p}" for p in found] if is_remote(uri) else found

    def delete(self, uri: str, recursive: bool = False) -> None:
        fs, path = self.fs(uri)
        if fs.exists(path):
            fs.rm(path, recursive=recursive)

    def move(self, src: str, dst: str) -> None:
        """Move one object or folder (a rename locally; copy + delete on S3)."""
        fs, spath = self.fs(src)
        _, dpath = self.fs(dst)
        if not is_remote(src):
            os.makedirs(os.path.dirname(dpath) or ".", exist_ok=True)
            os.replace(spath, dpath)
            return
        # object by object: s3fs's recursive mv also tries to copy folder markers, which some
        # S3-compatible stores list but cannot copy
        if fs.isfile(spath):
            fs.copy(spath, dpath)
            fs.rm(spath)
            return
        for key in fs.find(spath):
            fs.copy(key, dpath + "/" + posixpath.relpath(key, spath.rstrip("/")))
        fs.rm(spath, recursive=True)

    # -- whole files -------------------------------------------------------------------------------
    def get_file(self, uri: str, local: str | Path) -> Path:
        """Download ``uri`` to ``local`` (atomically); returns the local path."""
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        fs, path = self.fs(uri)
        tmp = local.with_name(f"{local.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            fs.get_file(path, str(tmp))
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)
        return local

    def put_file(self, local: str | Path, uri: str) -> None:
        """Upload (or copy) a local file to ``uri`` atomically."""
        fs, path = self.fs(uri)
        if is_remote(uri):
            fs.put_file(str(local), path)
            return
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        shutil.copyfile(local, tmp)
        os.replace(tmp, path)

    def localize_dir(self, uri: str, cache_root: str | Path | None = None) -> Path:
        """A local folder with the contents of ``uri`` (see :func:`vbatch.operators.cache.localize_dir`)."""
        from vbatch.operators.cache import localize_dir  # the cache builds on this module

        return localize_dir(self, uri, cache_root)
