"""Every path in vbatch is a URI: a local path, ``file://…``, ``s3://bucket/key`` or, for reading
images and videos named in a manifest, ``http(s)://…``.

Object storage goes through s3fs (fsspec); Ray Data and pyarrow get the same filesystem wrapped as a
``pyarrow.fs.PyFileSystem``, so the job's own reads/writes and Ray's use one configuration.
Credentials come from the standard AWS environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, profiles, instance roles) as botocore resolves them in each worker; the
endpoint from ``--s3-endpoint`` or ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``.

Transient failures (connection refused or reset, timeouts, HTTP 5xx, throttling) are retried with
exponential backoff and full jitter for up to :attr:`StorageOptions.retry_seconds` (default 180 s,
``--io-retry-seconds`` / ``VBATCH_IO_RETRY_SECONDS``), on top of botocore's own ``standard`` retry
mode; when they run out, the error is a :class:`StorageUnavailableError` whose message starts with
``storage unavailable`` so that the row is counted as an infrastructure error, not a bad input.
The same holds for s3fs and for :meth:`Storage.arrow_fs`'s pyarrow filesystem
(:mod:`vbatch.operators.s3`): an unreachable store is never a missing object. Messages and logs
that quote a URI redact its credentials (:func:`vbatch.operators.redact.redact_uri`).

Writes are atomic: a local file is written under a temporary name and ``os.replace``-d; an S3 object
becomes visible only when its single PUT completes. Names are deterministic, so a repeated run
overwrites instead of duplicating.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import posixpath
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import fsspec
import pyarrow.fs as pafs

from vbatch.models.fileio import atomic_path, atomic_write_bytes
from vbatch.operators.defaults import DEFAULT_RETRY_SECONDS
from vbatch.operators.redact import redact_uri

logger = logging.getLogger(__name__)

_REMOTE_SCHEMES = ("s3", "s3a")
#: read-only schemes, for the images and videos a manifest names (CDN URLs)
_HTTP_SCHEMES = ("http", "https")
SUPPORTED = "local paths, file://, s3://, http(s)://"

T = TypeVar("T")


def _default_retry_seconds() -> float:
    return float(os.environ.get("VBATCH_IO_RETRY_SECONDS", DEFAULT_RETRY_SECONDS))


class UnsupportedURIError(ValueError):
    """A URI whose scheme vbatch cannot read or write."""


class StorageUnavailableError(OSError):
    """Transient storage errors persisted past the retry budget: infrastructure, not data."""


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
    #: total seconds spent retrying one operation's transient errors; read from
    #: ``VBATCH_IO_RETRY_SECONDS`` on the driver, then shipped with the options to every worker
    retry_seconds: float = field(default_factory=_default_retry_seconds)

    def resolved_endpoint(self) -> str | None:
        return (
            self.endpoint_url
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
            or None
        )


def scheme_of(uri: str) -> str:
    """``"s3"`` for ``s3://…``, ``"https"`` for ``https://…``, ``"file"`` for local paths and
    ``file://``."""
    if "://" in uri:
        return uri.split("://", 1)[0].lower()
    return "file"


def is_remote(uri: str) -> bool:
    """Object storage (S3): written through s3fs, listed, cached per node."""
    return scheme_of(uri) in _REMOTE_SCHEMES


def is_http(uri: str) -> bool:
    return scheme_of(uri) in _HTTP_SCHEMES


def _check_scheme(uri: str) -> str:
    scheme = scheme_of(uri)
    if scheme not in (*_REMOTE_SCHEMES, *_HTTP_SCHEMES, "file"):
        raise UnsupportedURIError(f"unsupported URI scheme {scheme!r} (supported: {SUPPORTED})")
    return scheme


def _strip(uri: str) -> str:
    """The path part: ``bucket/key`` for S3, the URL for HTTP, an absolute local path otherwise."""
    scheme = _check_scheme(uri)
    if scheme in _REMOTE_SCHEMES:
        return uri.split("://", 1)[1]
    if scheme in _HTTP_SCHEMES:
        return uri
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    return os.path.abspath(os.path.expanduser(path))


def normalize(uri: str) -> str:
    """Canonical form: ``s3://bucket/key``, the URL, or an absolute local path."""
    path = _strip(uri)
    return f"s3://{path}" if is_remote(uri) else path


def join(base: str, *parts: str) -> str:
    """Join path parts onto a URI with ``/`` (also for local paths on POSIX)."""
    if is_remote(base):
        return "s3://" + posixpath.join(_strip(base), *parts)
    if is_http(base):
        return posixpath.join(base, *parts)
    return os.path.join(_strip(base), *parts)


def parent(uri: str) -> str:
    if is_remote(uri):
        return "s3://" + posixpath.dirname(_strip(uri).rstrip("/"))
    if is_http(uri):
        return posixpath.dirname(uri.rstrip("/"))
    return os.path.dirname(_strip(uri).rstrip("/"))


def resolve(uri: str, base: str) -> str:
    """Resolve ``uri`` from a manifest against the manifest's folder ``base`` when it is relative.

    Relative means a plain relative path or a ``file://`` URI with a relative path
    (``file://clips/a.mp4``): both name a file next to the manifest, whatever the worker's working
    directory. Raises :class:`UnsupportedURIError` for other schemes (``gs://``, ``ftp://``).
    """
    scheme = _check_scheme(uri)
    if scheme == "file":
        path = uri[len("file://") :] if uri.startswith("file://") else uri
        if not os.path.isabs(os.path.expanduser(path)):
            return join(base, path)
    return normalize(uri)


def _hidden_http_error(e: FileNotFoundError) -> BaseException | None:
    """The failure that fsspec's HTTP ``info`` hid behind ``e``, or ``None`` for a true 404/410.

    fsspec raises ``FileNotFoundError(url)`` for every failure of its HEAD and GET: a 503, a 403, a
    refused connection or a TLS error alike. Re-raised as themselves, they are retried or reported
    as :meth:`Storage.read_bytes` reports them, so an image and a video fail with the same words.
    """
    cause = e.__cause__
    if cause is None or getattr(cause, "status", None) in (404, 410):
        return None
    return cause


def describe_read_error(e: BaseException, uri: str, what: str = "") -> str:
    """The error message of a row whose object at ``uri`` could not be read (``what``: e.g.
    ``"video "`` for "cannot read video …"), with the credentials of every URL in it redacted
    (the exception's own text quotes the URL too)."""
    return redact_uri(_read_error(e, uri, what))


def _read_error(e: BaseException, uri: str, what: str) -> str:
    if isinstance(e, (StorageUnavailableError, UnsupportedURIError)):
        return str(e)
    if isinstance(e, FileNotFoundError):
        return f"object not found: {uri}"
    if isinstance(e, IsADirectoryError):
        return f"is a folder, not a file: {uri}"
    if isinstance(e, PermissionError):
        return f"access denied reading {uri}: {e}"
    first_line = str(e).splitlines()[0] if str(e) else ""
    return f"cannot read {what}{uri}: {type(e).__name__}: {first_line}"


# errno values of transient failures: s3fs maps HTTP 500 to EREMOTEIO and 503 (SlowDown) to EBUSY
_TRANSIENT_ERRNOS = {
    getattr(errno, "EREMOTEIO", 121),
    errno.EBUSY,
    errno.ETIMEDOUT,
    errno.ECONNREFUSED,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.EPIPE,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.ENETDOWN,
    errno.EAGAIN,
}
# exception classes (by name: botocore, aiohttp and urllib3 are imported lazily) of failures to
# reach a store, as opposed to answers from it
_TRANSIENT_NAMES = {
    "EndpointConnectionError",
    "ConnectionClosedError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ProxyConnectionError",
    "ResponseStreamingError",
    "IncompleteRead",
    "ClientConnectorError",
    "ClientConnectionError",
    "ClientOSError",
    "ServerDisconnectedError",
    "ServerTimeoutError",
    "ClientPayloadError",
    "FSTimeoutError",
    "TimeoutError",
    "ConnectionError",
    "ConnectionRefusedError",
    "ConnectionResetError",
}
# an EIO/ClientError text that the store itself calls temporary
_TRANSIENT_TEXT = re.compile(
    r"try again|slow ?down|throttl|temporarily|service ?unavailable|internal ?error|timed? ?out",
    re.IGNORECASE,
)


def _chain(e: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and cur not in seen and len(seen) < 8:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def is_transient(e: BaseException) -> bool:
    """Whether ``e`` is a failure to reach the store (retry) rather than its answer (don't).

    Missing objects, denied access and unsupported URIs are answers; connection errors, timeouts,
    HTTP 5xx and 429 and throttling are not.
    """
    for x in _chain(e):
        if isinstance(
            x, (FileNotFoundError, PermissionError, IsADirectoryError, UnsupportedURIError)
        ):
            return False
        if type(x).__name__ in _TRANSIENT_NAMES:
            return True
        status = getattr(x, "status", None) or getattr(x, "status_code", None)
        if isinstance(status, int) and (status >= 500 or status == 429):
            return True
        if isinstance(x, OSError) and x.errno in _TRANSIENT_ERRNOS:
            return True
        if isinstance(x, OSError) and x.errno == errno.EIO and _TRANSIENT_TEXT.search(str(x)):
            return True
    return False


def with_retries(fn: Callable[[], T], what: str, budget_s: float) -> T:
    """Call ``fn``, retrying transient errors with exponential backoff and full jitter.

    Args:
        fn: the operation; it must be safe to repeat (reads, whole-object writes, deletes).
        what: what is being done, for the log (``"read s3://b/k"``; redacted here).
        budget_s: total seconds of retrying before giving up.

    Raises:
        StorageUnavailableError: the transient error persisted for ``budget_s``.
        Exception: any other error of ``fn``, at once.
    """
    start = time.monotonic()
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as e:
            if not is_transient(e):
                raise
            elapsed = time.monotonic() - start
            # full jitter (AWS architecture blog): spreads the retries of many workers
            delay = random.uniform(0, min(20.0, 0.5 * 2**attempt))
            if elapsed + delay > budget_s:
                first = str(e).splitlines()[0] if str(e) else ""
                raise StorageUnavailableError(
                    redact_uri(
                        f"storage unavailable after {attempt} retries ({elapsed:.0f} s): "
                        f"{type(e).__name__}: {first}"
                    )
                ) from e
            attempt += 1
            if attempt == 1:
                logger.warning(
                    "%s; retrying for up to %.0f s",
                    redact_uri(f"{what}: {type(e).__name__}: {e}"),
                    budget_s,
                )
            time.sleep(delay)


def _s3(options: StorageOptions) -> fsspec.AbstractFileSystem:
    # imported lazily: local-only runs never need boto
    from vbatch.operators.s3 import StrictS3FileSystem

    kwargs: dict[str, Any] = dict(options.extra)
    endpoint = options.resolved_endpoint()
    if endpoint:
        kwargs["endpoint_url"] = endpoint
    config = dict(kwargs.pop("config_kwargs", {}))
    # botocore's standard retry mode (connection errors, 5xx, throttling) for every request,
    # including Ray Data's manifest reads and results writes; the outer, time-bounded loop of
    # with_retries covers outages longer than its few attempts
    config.setdefault("retries", {"mode": "standard", "max_attempts": 4})
    config.setdefault("connect_timeout", 10)
    config.setdefault("read_timeout", 60)
    # listings change under us (other workers write); never serve a stale directory listing
    return StrictS3FileSystem(
        anon=options.anon, use_listings_cache=False, config_kwargs=config, **kwargs
    )


def _http() -> fsspec.AbstractFileSystem:
    # simple_links=False: never crawl pages for links; these URLs name files
    return fsspec.filesystem("http", simple_links=False)


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
        if is_http(uri):
            return _http(), _strip(uri)
        return fsspec.filesystem("file"), _strip(uri)

    def arrow_fs(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """A pyarrow filesystem (for Ray Data and pyarrow readers/writers) and the path for it.

        On S3, its look-ups, opens and reads are retried as this class's own reads are
        (:class:`vbatch.operators.s3.RetryingFSSpecHandler`)."""
        if is_remote(uri):
            from vbatch.operators.s3 import RetryingFSSpecHandler

            handler = RetryingFSSpecHandler(_s3(self.options), self.options.retry_seconds, "s3://")
            return pafs.PyFileSystem(handler), _strip(uri)
        if is_http(uri):
            raise UnsupportedURIError(
                f"{redact_uri(uri)}: manifests and outputs live on local paths or s3://; "
                "http(s):// is for the images and videos a manifest names"
            )
        return pafs.LocalFileSystem(), _strip(uri)

    def _retry(self, what: str, fn: Callable[[], T], uri: str) -> T:
        if not (is_remote(uri) or is_http(uri)):
            return fn()  # a local disk's errors are not worth retrying
        return with_retries(fn, f"{what} {uri}", self.options.retry_seconds)

    def _writable(self, uri: str) -> None:
        if is_http(uri):
            raise UnsupportedURIError(
                f"cannot write to {redact_uri(uri)}: http(s):// is read-only here"
            )

    # -- objects -----------------------------------------------------------------------------------
    def read_bytes(self, uri: str) -> bytes:
        """Whole object; ``FileNotFoundError`` when it does not exist."""
        fs, path = self.fs(uri)
        return self._retry("read", lambda: fs.cat_file(path), uri)

    def info(self, uri: str) -> dict[str, Any]:
        """The object's metadata (``size``; ``ETag`` on S3); ``FileNotFoundError`` only when the
        store says there is no such object (see :func:`_hidden_http_error`)."""
        fs, path = self.fs(uri)

        def look_up() -> dict[str, Any]:
            try:
                return dict(fs.info(path))
            except FileNotFoundError as e:
                hidden = _hidden_http_error(e) if is_http(uri) else None
                if hidden is None:
                    raise
            raise hidden  # outside the except: no cycle through e's __context__

        return self._retry("look up", look_up, uri)

    def size(self, uri: str) -> int:
        return int(self.info(uri)["size"])

    def exists(self, uri: str) -> bool:
        """Whether the store says there is an object or folder at ``uri`` (through :meth:`info`:
        a store that cannot be reached raises, it is never "no")."""
        try:
            self.info(uri)
        except FileNotFoundError:
            return False
        return True

    def write_bytes(self, uri: str, data: bytes, content_type: str | None = None) -> None:
        """Write an object atomically (readers see the old or the new content, never a part).

        ``content_type``: the object's Content-Type on S3 (what a browser served the object from
        a bucket goes by, e.g. ``text/html``); ignored locally."""
        self._writable(uri)
        fs, path = self.fs(uri)
        if is_remote(uri):
            headers = {"ContentType": content_type} if content_type else {}
            self._retry("write", lambda: fs.pipe_file(path, data, **headers), uri)
            return
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        atomic_write_bytes(path, data, durable=False)

    def create(self, uri: str, data: bytes) -> bool:
        """Write ``uri`` only if nothing is there: an ``O_EXCL`` create locally, a conditional
        PUT (``If-None-Match: *``) on S3, so that of two writers exactly one creates it.

        Returns:
            True when this call created the object, False when it already existed (a retried PUT
            whose first attempt had landed also answers False: compare the content to tell).
        """
        self._writable(uri)
        fs, path = self.fs(uri)
        if is_remote(uri):

            def put() -> bool:
                try:
                    fs.pipe_file(path, data, mode="create")
                except OSError as e:
                    # s3fs maps S3's 412 PreconditionFailed to EINVAL; nothing else does here
                    if e.errno == errno.EINVAL and "pre-condition" in str(e).lower():
                        return False
                    raise
                return True

            return self._retry("create", put, uri)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def makedirs(self, uri: str) -> None:
        """Local folders are created; S3 has no folders (a no-op there)."""
        if not is_remote(uri):
            os.makedirs(_strip(uri), exist_ok=True)

    def list_files(self, uri: str, suffix: str = "") -> list[str]:
        """Files directly or recursively under ``uri`` (sorted URIs), or ``[uri]`` if it is a file."""
        fs, path = self.fs(uri)

        def listing() -> list[str]:
            try:
                kind = fs.info(path)["type"]
            except FileNotFoundError:  # the store's answer; an outage raises and is retried
                return []
            if kind == "file":
                return [normalize(uri)]
            found = sorted(p for p in fs.find(path) if p.endswith(suffix))
            return [f"s3://{p}" for p in found] if is_remote(uri) else found

        return self._retry("list", listing, uri)

    def delete(self, uri: str, recursive: bool = False) -> None:
        self._writable(uri)
        fs, path = self.fs(uri)

        def rm() -> None:
            if fs.exists(path):
                fs.rm(path, recursive=recursive)

        self._retry("delete", rm, uri)

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
        # each step is repeatable on its own (a copy overwrites, a delete of nothing is nothing)
        if self._retry("look up", lambda: fs.isfile(spath), src):
            self._retry("copy", lambda: fs.copy(spath, dpath), src)
            self._retry("delete", lambda: fs.rm(spath), src)
            return
        for key in self._retry("list", lambda: fs.find(spath), src):
            target = dpath + "/" + posixpath.relpath(key, spath.rstrip("/"))
            self._retry("copy", functools.partial(fs.copy, key, target), src)
        self._retry("delete", lambda: fs.rm(spath, recursive=True), src)

    def copy(self, src: str, dst: str) -> None:
        """Copy one object: server-side (``CopyObject``) within S3, else through this process.
        Readers of ``dst`` see the old or the new content, as with :meth:`write_bytes`."""
        self._writable(dst)
        if is_remote(src) and is_remote(dst):
            fs, spath = self.fs(src)
            _, dpath = self.fs(dst)
            self._retry("copy", lambda: fs.copy(spath, dpath), src)
            return
        self.write_bytes(dst, self.read_bytes(src))

    def list_entries(self, uri: str) -> list[dict[str, Any]]:
        """The entries directly in folder ``uri``, fresh from the store (one LIST per 1,000 keys on
        S3), with their metadata (``name``, ``type``, ``size``; ``ETag`` on S3, ``mtime`` locally).
        Empty when there is no such folder."""
        fs, path = self.fs(uri)
        fs.invalidate_cache(path)

        def ls() -> list[dict[str, Any]]:
            try:
                return list(fs.ls(path, detail=True))
            except (FileNotFoundError, NotADirectoryError):
                return []

        return self._retry("list", ls, uri)

    # -- whole files -------------------------------------------------------------------------------
    def get_file(self, uri: str, local: str | Path) -> Path:
        """Download ``uri`` to ``local`` (atomically); returns the local path."""
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        fs, path = self.fs(uri)
        with atomic_path(local) as tmp:
            self._retry("download", lambda: fs.get_file(path, str(tmp)), uri)
        return local

    def put_file(self, local: str | Path, uri: str) -> None:
        """Upload (or copy) a local file to ``uri`` atomically."""
        self._writable(uri)
        fs, path = self.fs(uri)
        if is_remote(uri):
            self._retry("upload", lambda: fs.put_file(str(local), path), uri)
            return
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with atomic_path(path) as tmp:
            shutil.copyfile(local, tmp)

    def localize_dir(self, uri: str, cache_root: str | Path | None = None) -> Path:
        """A local folder with the contents of ``uri`` (see :func:`vbatch.operators.cache.localize_dir`)."""
        from vbatch.operators.cache import localize_dir  # the cache builds on this module

        return localize_dir(self, uri, cache_root)
