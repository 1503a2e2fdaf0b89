"""S3 through s3fs and pyarrow, where a store that cannot be reached is never a missing object.

fsspec's ``isfile`` catches every exception and answers ``False`` (s3fs's ``exists`` on a bucket
too), and pyarrow's ``FSSpecHandler.open_input_file`` asks ``isfile`` first: during an outage an
existing object read as missing, a ``FileNotFoundError`` that no retry loop retries (a distributed
index build failed so with S3 stopped for 10 s). Here a failure to reach the store is raised as
itself and retried by :func:`vbatch.operators.storage.with_retries`, whichever API asked; only the
store's own answer (no such key or prefix) is "missing", and it comes at once.

Imported lazily by :mod:`vbatch.operators.storage` (local-only runs never need boto); Ray pickles
both classes by name to its workers.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
import pyarrow.fs as pafs
import s3fs
from fsspec.asyn import sync_wrapper

from vbatch.operators.storage import is_transient, with_retries

T = TypeVar("T")


class StrictS3FileSystem(s3fs.S3FileSystem):
    """``s3fs.S3FileSystem`` whose ``isfile`` and ``exists`` raise when the store is unreachable."""

    async def _isfile(self, path: str) -> bool:
        try:
            info: dict[str, Any] = await self._info(path)
        except FileNotFoundError:
            return False
        return info["type"] == "file"

    async def _exists(self, path: str, **kwargs: Any) -> bool:
        bucket, key, _ = self.split_path(self._strip_protocol(path))
        if bucket and not key:
            # s3fs probes a bucket with two calls and reads any failure as "no such bucket"
            try:
                await self._call_s3("head_bucket", Bucket=bucket)
                return True
            except Exception as e:
                if is_transient(e):
                    raise
        exists: bool = await super()._exists(path, **kwargs)
        return exists

    # s3fs binds its own coroutine here; fsspec mirrors the others (isfile) from the overrides
    exists = sync_wrapper(_exists)


class RetryingFSSpecHandler(pafs.FSSpecHandler):
    """pyarrow's bridge to an fsspec filesystem, with look-ups, opens and reads retried by
    :func:`with_retries`, as :class:`Storage`'s own reads are.

    A look-up is ``fs.info()``, whose ``FileNotFoundError`` is the store's answer and comes at
    once (pyarrow's own handler asks ``fs.isfile()``, see the module docstring); every other
    failure is retried while transient. Writes are not retried here: an output stream is one
    upload that Ray Data or the caller repeats as a whole.

    Args:
        fs: the fsspec filesystem (s3fs).
        budget_s: seconds of retrying per operation (:attr:`StorageOptions.retry_seconds`).
        prefix: put before a path in log lines (``"s3://"``).
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, budget_s: float, prefix: str = "") -> None:
        super().__init__(fs)
        self.budget_s, self.prefix = budget_s, prefix

    def retry(self, what: str, path: str, fn: Callable[[], T]) -> T:
        return with_retries(fn, f"{what} {self.prefix}{path}", self.budget_s)

    def _info(self, path: str) -> dict[str, Any]:
        return dict(self.retry("look up", path, lambda: self.fs.info(path)))

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        infos = []
        for path in paths:
            try:
                infos.append(self._create_file_info(path, self._info(path)))
            except FileNotFoundError:
                infos.append(pafs.FileInfo(path, pafs.FileType.NotFound))
        return infos

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        base = selector.base_dir
        try:
            kind = self._info(base)["type"]
        except FileNotFoundError:
            if selector.allow_not_found:
                return []
            raise
        if kind != "directory":
            raise NotADirectoryError(base)
        depth = None if selector.recursive else 1
        found = self.retry(
            "list",
            base,
            lambda: self.fs.find(base, maxdepth=depth, withdirs=True, detail=True),
        )
        # the base folder itself is not an entry of its listing (as in FSSpecHandler)
        return [
            self._create_file_info(p, info)
            for p, info in found.items()
            if p.strip("/") != base.strip("/")
        ]

    def _open_for_reading(self, path: str) -> Any:
        from pyarrow import PythonFile

        if self._info(path)["type"] != "file":
            raise FileNotFoundError(path)  # a folder: what FSSpecHandler raises too
        handle = self.retry("open", path, lambda: self.fs.open(path, mode="rb"))
        return PythonFile(_RetryingReader(handle, self, path), mode="r")

    def open_input_file(self, path: str) -> Any:
        return self._open_for_reading(path)

    def open_input_stream(self, path: str) -> Any:
        return self._open_for_reading(path)


class _RetryingReader(io.RawIOBase):
    """A seekable fsspec file whose reads are retried from where they started (a failed read
    leaves the position where it was, or is put back there before the next try)."""

    def __init__(self, handle: Any, handler: RetryingFSSpecHandler, path: str) -> None:
        super().__init__()
        self.handle, self.handler, self.path = handle, handler, path

    def read(self, size: int = -1) -> bytes:
        start = self.handle.tell()

        def read_from_start() -> bytes:
            self.handle.seek(start)
            data: bytes = self.handle.read(size)
            return data

        return self.handler.retry("read", self.path, read_from_start)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(memoryview(buffer)))
        memoryview(buffer).cast("B")[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return int(self.handle.seek(offset, whence))

    def tell(self) -> int:
        return int(self.handle.tell())

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        self.handle.close()
        super().close()
