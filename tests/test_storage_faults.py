"""Storage faults: unsupported and http(s) URIs, transient errors retried, outages survived.

The S3 outage test stops the session's SeaweedFS server while a job runs and starts it again on the
same ports and data folder: the job must end with every image ``ok``.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import http.server
import io
import json
import logging
import math
import pickle
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from fsspec import AbstractFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from vbatch.jobs.demo_data import encode, product_image
from vbatch.jobs.segment import ImageJobConfig, run_image_job
from vbatch.operators.s3 import RetryingFSSpecHandler, StrictS3FileSystem
from vbatch.operators.storage import (
    Storage,
    StorageOptions,
    StorageUnavailableError,
    UnsupportedURIError,
    is_transient,
    join,
    resolve,
    with_retries,
)

# -- classification and the retry loop -------------------------------------------------------------


class EndpointConnectionError(Exception):  # botocore's, by name: botocore is imported lazily
    pass


def test_transient_errors_are_told_from_answers() -> None:
    assert is_transient(EndpointConnectionError("Could not connect to the endpoint URL"))
    assert is_transient(OSError(121, "We encountered an internal error, please try again"))
    assert is_transient(OSError(errno.EBUSY, "SlowDown"))
    assert is_transient(ConnectionResetError())
    wrapped = OSError(errno.EIO, "write failed")
    wrapped.__cause__ = TimeoutError()
    assert is_transient(wrapped)
    assert not is_transient(FileNotFoundError("s3://b/k"))
    assert not is_transient(PermissionError("AccessDenied"))
    assert not is_transient(OSError(errno.EIO, "InvalidArgument"))
    assert not is_transient(UnsupportedURIError("unsupported URI scheme 'gs'"))
    assert not is_transient(ValueError("bad"))


def test_with_retries_rides_out_transient_errors_and_gives_up_clearly() -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        return "ok"

    assert with_retries(flaky, "read x", budget_s=30) == "ok" and len(calls) == 3

    def down() -> None:
        raise OSError(121, "We encountered an internal error, please try again")

    with pytest.raises(StorageUnavailableError, match=r"^storage unavailable after \d+ retries"):
        with_retries(down, "read x", budget_s=0.5)

    def missing() -> None:
        calls.append(1)
        raise FileNotFoundError("gone")

    calls.clear()
    with pytest.raises(FileNotFoundError):  # an answer: no retry at all
        with_retries(missing, "read x", budget_s=30)
    assert len(calls) == 1


def test_resolve_rules() -> None:
    assert resolve("a/b.jpg", "/data/m") == "/data/m/a/b.jpg"
    # a relative file:// uri names a file next to the manifest, not in the worker's cwd
    assert resolve("file://clips/a.mp4", "/data/m") == "/data/m/clips/a.mp4"
    assert resolve("file:///abs/a.mp4", "/data/m") == "/abs/a.mp4"
    assert resolve("x.jpg", "s3://bucket/m") == "s3://bucket/m/x.jpg"
    assert resolve("https://cdn.example.com/a.jpg", "/data") == "https://cdn.example.com/a.jpg"
    with pytest.raises(UnsupportedURIError, match=r"unsupported URI scheme 'gs' \(supported: "):
        resolve("gs://bucket/a.jpg", "/data")


# -- http(s) images in a job ----------------------------------------------------------------------


class _Handler(http.server.SimpleHTTPRequestHandler):
    flaky_left = 2  # /flaky/…: two 503s, then the file

    def do_GET(self) -> None:
        if self.path.startswith("/down/"):
            self.send_error(500, "internal error")
            return
        if self.path.startswith("/flaky/"):
            if _Handler.flaky_left > 0:
                _Handler.flaky_left -= 1
                self.send_error(503, "slow down")
                return
            self.path = self.path[len("/flaky") :]
        super().do_GET()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def http_root(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "www"
    root.mkdir()
    handler = lambda *a, **k: _Handler(*a, directory=str(root), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()


def test_http_uris_and_unsupported_schemes_are_rows(
    ray_session, tmp_path: Path, salient_dir: Path, http_root, monkeypatch
) -> None:
    url, root = http_root
    (root / "a.jpg").write_bytes(encode(product_image(1, (50, 40))))
    (root / "b.png").write_bytes(encode(product_image(2, (30, 60)), "PNG"))
    rows = {
        "http-ok": (f"{url}/a.jpg", "ok", None),
        "http-flaky": (f"{url}/flaky/b.png", "ok", None),
        "http-404": (f"{url}/nope.jpg", "error", "object not found"),
        "http-500": (f"{url}/down/a.jpg", "error", "storage unavailable after"),
        "gs": ("gs://bucket/a.jpg", "error", "unsupported URI scheme 'gs'"),
        "ftp": ("ftp://host/a.jpg", "error", "unsupported URI scheme 'ftp'"),
        "local": ("c.jpg", "ok", None),
    }
    (tmp_path / "c.jpg").write_bytes(encode(product_image(3, (20, 20))))
    pq.write_table(
        pa.table({"image_id": list(rows), "uri": [v[0] for v in rows.values()]}),
        tmp_path / "manifest.parquet",
    )
    monkeypatch.setenv("VBATCH_IO_RETRY_SECONDS", "3")  # the 500s give up quickly
    run_image_job(
        ImageJobConfig(
            "salient",
            str(tmp_path / "manifest.parquet"),
            str(salient_dir),
            str(tmp_path / "out"),
            # the permanent 500 is one infrastructure row of 7: published, not failed, here
            max_infra_error_rate=0.5,
            max_error_rate=1.0,
        )
    )
    table = pq.read_table(tmp_path / "out" / "results")
    got = {r["image_id"]: r for r in table.to_pylist()}
    assert sorted(got) == sorted(rows)
    for image_id, (_uri, status, fragment) in rows.items():
        assert got[image_id]["status"] == status, (image_id, got[image_id]["error"])
        if fragment:
            assert fragment in got[image_id]["error"], got[image_id]["error"]
    assert got["http-ok"]["width"] == 50 and got["http-flaky"]["height"] == 60


def test_http_is_read_only(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedURIError, match="read-only"):
        Storage().write_bytes("https://example.com/x.png", b"x")
    with pytest.raises(UnsupportedURIError, match="manifests and outputs"):
        Storage().arrow_fs("https://example.com/m.parquet")


# -- S3 outage ------------------------------------------------------------------------------------


def test_job_survives_s3_outage(ray_session, s3_server, tmp_path: Path, salient_dir: Path) -> None:
    """Images and outputs on S3; the server goes down mid-run and comes back: every row ``ok``."""
    storage = s3_server.storage()
    bucket = s3_server.new_bucket()
    n = 30
    ids = [f"img-{i:02d}" for i in range(n)]
    for i, image_id in enumerate(ids):
        storage.write_bytes(
            join(bucket, "imgs", f"{image_id}.jpg"), encode(product_image(i, (40, 30)))
        )
    pq.write_table(
        pa.table({"image_id": ids, "uri": [join(bucket, "imgs", f"{i}.jpg") for i in ids]}),
        tmp_path / "manifest.parquet",
    )
    times: dict[str, float] = {}

    def outage() -> None:
        time.sleep(4)
        times["down"] = time.monotonic()
        s3_server.stop()
        time.sleep(12)
        s3_server.start()
        times["up"] = time.monotonic()

    out = join(bucket, "out")
    thread = threading.Thread(target=outage)
    start = time.monotonic()
    thread.start()
    try:
        summary = run_image_job(
            ImageJobConfig(
                "salient",
                str(tmp_path / "manifest.parquet"),
                str(salient_dir),
                out,
                batch_size=2,
                s3_endpoint=s3_server.endpoint,
            )
        )
    finally:
        thread.join()
    end = time.monotonic()
    # the job lived through the outage (else this test tested nothing)
    assert start < times["down"] and end > times["up"]
    assert (summary.rows, summary.ok) == (n, n)
    fs, path = storage.arrow_fs(join(out, "results"))
    table = pq.read_table(path, filesystem=fs)
    assert sorted(table["image_id"].to_pylist()) == ids
    assert set(table["status"].to_pylist()) == {"ok"}
    assert len(storage.list_files(join(out, "products"), ".png")) == n


def test_second_seaweedfs_server_starts_alongside(s3_server, tmp_path: Path) -> None:
    """The fixture's server no longer holds SeaweedFS's fixed Lance/Iceberg ports."""
    from tests.conftest import S3Server, _free_port

    # every port of its own, the Iceberg catalog's too (the fixture's is a free port, not 8181)
    flags = {"-s3.port": "s3", "-master.port": "master", "-volume.port": "volume",
             "-filer.port": "filer", "-s3.port.iceberg": "iceberg"}  # fmt: skip
    ports = {k: _free_port() for k in flags.values()}
    cmd = [
        f"{a.split('=')[0]}={ports[flags[a.split('=')[0]]]}"
        if a.split("=")[0] in flags
        else (f"-dir={tmp_path}" if a.startswith("-dir=") else a)
        for a in s3_server.cmd
    ]
    other = S3Server(cmd, tmp_path)
    other.start(timeout=60)
    try:
        bucket = other.new_bucket()
        other.storage().write_bytes(join(bucket, "x"), b"hello")
        assert other.storage().read_bytes(join(bucket, "x")) == b"hello"
    finally:
        other.stop()


# -- a store that cannot be reached is never "not found" (pyarrow, fsspec) ------------------------


class _FlakyMemoryFS(MemoryFileSystem):
    """An in-memory store with S3-style paths (``bucket/key``) where each look-up, open and read of
    a path that ``fails`` picks first fails ``times`` times with a refused or reset connection,
    then succeeds (``times=math.inf``: the store is down for good); a failing read has moved the
    file position, as a dropped response does. fsspec's generic ``isfile`` (s3fs's too) reads
    such a failure as "no such file"."""

    cachable = False  # a fresh set of faults per instance

    def __init__(self, times: float = 1, fails: Callable[[str], bool] = lambda path: True) -> None:
        super().__init__()
        self.times, self.fails = times, fails
        self.failures: collections.Counter = collections.Counter()

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        return super()._strip_protocol(path).lstrip("/")

    def fail(self, *key: object, path: str, reset: bool = False) -> None:
        if self.fails(path) and self.failures[key] < self.times:
            self.failures[key] += 1
            if reset:
                raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")

    def info(self, path: str, **kwargs):
        path = self._strip_protocol(path)
        self.fail("info", path, path=path)
        return super().info(path, **kwargs)

    def isfile(self, path: str) -> bool:
        return AbstractFileSystem.isfile(self, path)

    def _open(self, path: str, mode: str = "rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        if mode != "rb":
            return f
        self.fail("open", path, path=path)
        return _FlakyFile(f, self, path)


class _FlakyFile(io.RawIOBase):
    def __init__(self, f, fs: _FlakyMemoryFS, path: str) -> None:
        super().__init__()
        self.f, self.fs, self.path = f, fs, path

    def read(self, size: int = -1) -> bytes:
        start = self.f.tell()
        self.f.read(3)  # part of the answer arrives, then the connection may drop
        self.fs.fail("read", self.path, start, size, path=self.path, reset=True)
        self.f.seek(start)
        return self.f.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.f.seek(offset, whence)

    def tell(self) -> int:
        return self.f.tell()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True


def _parquet_bytes(n: int = 500, row_group_size: int = 100) -> tuple[pa.Table, bytes]:
    table = pa.table({"image_id": [f"img-{i}" for i in range(n)], "x": list(range(n))})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size)
    return table, buf.getvalue()


def test_arrow_reads_retry_what_fsspec_calls_missing(caplog) -> None:
    """Look-ups, opens and reads through the Arrow wrapper are retried; with pyarrow's own
    FSSpecHandler the same refused connection is a FileNotFoundError."""
    table, data = _parquet_bytes()
    root = f"flaky-{uuid.uuid4().hex}"

    def arrow_fs(handler_cls=RetryingFSSpecHandler) -> tuple[pafs.FileSystem, str]:
        fs = _FlakyMemoryFS()
        fs.pipe_file(f"{root}/t/a.parquet", data)
        handler = handler_cls(fs) if handler_cls is pafs.FSSpecHandler else handler_cls(fs, 30)
        return pafs.PyFileSystem(handler), f"{root}/t/a.parquet"

    fs, path = arrow_fs(pafs.FSSpecHandler)
    with pytest.raises(FileNotFoundError):  # the hole: an outage read as a missing file
        fs.open_input_file(path)

    fs, path = arrow_fs()
    with fs.open_input_file(path) as f:
        assert f.read() == data
    fs, path = arrow_fs()
    assert pq.read_table(path, filesystem=fs).equals(table)
    fs, path = arrow_fs()
    assert pads.dataset([path], filesystem=fs, format="parquet").to_table().equals(table)
    fs, path = arrow_fs()
    assert pads.dataset(f"{root}/t", filesystem=fs, format="parquet").to_table().equals(table)
    fs, path = arrow_fs()
    assert fs.get_file_info(path).type == pafs.FileType.File
    assert "retrying for up to 30 s" in caplog.text  # the faults were met, and retried

    # a missing file is an answer: reported at once, nothing retried
    caplog.clear()
    plain = pafs.PyFileSystem(RetryingFSSpecHandler(MemoryFileSystem(), 30))
    with pytest.raises(FileNotFoundError):
        plain.open_input_file(f"{root}/t/missing.parquet")
    with pytest.raises(FileNotFoundError):
        pq.read_table(f"{root}/t/missing.parquet", filesystem=plain)
    assert plain.get_file_info(f"{root}/nothing").type == pafs.FileType.NotFound
    assert "retrying" not in caplog.text

    # a store that stays unreachable: infrastructure, never "not found"
    down = pafs.PyFileSystem(RetryingFSSpecHandler(_FlakyMemoryFS(times=math.inf), 0.5))
    with pytest.raises(StorageUnavailableError, match=r"^storage unavailable"):
        down.open_input_file(path)


def _impatient_storage(server, retry_seconds: float) -> Storage:
    """The server's storage with botocore's own retries off: each failure reaches
    :func:`with_retries` at once (seconds per test instead of botocore's backoff per attempt)."""
    one_try = {"retries": {"mode": "standard", "max_attempts": 1}}
    return Storage(
        StorageOptions(
            endpoint_url=server.endpoint,
            retry_seconds=retry_seconds,
            extra=(("config_kwargs", one_try),),
        )
    )


@contextlib.contextmanager
def _outage(server, operations: int, deadline_s: float = 180) -> Iterator[dict]:
    """Stop the S3 server; start it again once ``operations`` storage operations have logged that
    they are retrying (proof that each met the outage), or after ``deadline_s``. Yields a dict
    whose ``"met"`` says which."""
    seen: list[str] = []
    enough = threading.Event()

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "retrying for up to" in record.getMessage():
                seen.append(record.getMessage())
                if len(seen) >= operations:
                    enough.set()

    handler = Seen(logging.WARNING)
    storage_logger = logging.getLogger("vbatch.operators.storage")
    storage_logger.addHandler(handler)
    result: dict = {"seen": seen}
    server.stop()

    def restart() -> None:
        result["met"] = enough.wait(deadline_s)
        server.start()

    thread = threading.Thread(target=restart)
    thread.start()
    try:
        yield result
    finally:
        thread.join()
        storage_logger.removeHandler(handler)


def test_reads_ride_out_an_s3_outage(s3_server) -> None:
    """Reads through ``Storage.arrow_fs`` (open, pyarrow.parquet, pyarrow.dataset) and Storage's
    own look-ups, begun while the server is down, succeed once it is back; a missing object is
    reported at once."""
    storage = _impatient_storage(s3_server, retry_seconds=120)
    bucket = s3_server.new_bucket()
    table, data = _parquet_bytes()
    uri = join(bucket, "t", "a.parquet")
    storage.write_bytes(uri, data)
    fs, path = storage.arrow_fs(uri)
    folder = storage.arrow_fs(join(bucket, "t"))[1]
    s3 = storage.fs(uri)[0]
    readers = {
        "open_input_file": lambda: fs.open_input_file(path).read(),
        "read_table": lambda: pq.read_table(path, filesystem=fs),
        "dataset": lambda: pads.dataset(folder, filesystem=fs, format="parquet").to_table(),
        "exists": lambda: storage.exists(uri),
        "list_files": lambda: storage.list_files(join(bucket, "t")),
        # s3fs's yes/no questions, which fsspec answered "no" for an unreachable store
        "isfile": lambda: with_retries(lambda: s3.isfile(path), "isfile", 120),
        "bucket exists": lambda: with_retries(lambda: s3.exists(bucket), "exists", 120),
    }
    results: dict = {}

    def run(name: str) -> None:
        try:
            results[name] = readers[name]()
        except Exception as e:
            results[name] = e

    with _outage(s3_server, operations=len(readers), deadline_s=60) as outage:
        threads = [threading.Thread(target=run, args=(name,)) for name in readers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert outage["met"], [m.split(": ")[0] for m in outage["seen"]]  # each met the outage
    assert results["open_input_file"] == data
    assert results["read_table"].equals(table)
    assert results["dataset"].equals(table)
    assert results["exists"] is True
    assert results["list_files"] == [uri]
    assert results["isfile"] is True and results["bucket exists"] is True

    # what is missing is an answer, at once (no retry budget spent)
    missing = path.replace("a.parquet", "b.parquet")
    with pytest.raises(FileNotFoundError):
        fs.open_input_file(missing)
    with pytest.raises(FileNotFoundError):
        pq.read_table(missing, filesystem=fs)
    with pytest.raises(FileNotFoundError):
        pads.dataset([missing], filesystem=fs, format="parquet")
    assert not storage.exists(join(bucket, "t", "b.parquet"))
    assert storage.list_files(join(bucket, "nothing")) == []
    assert not storage.exists(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}")


def test_arrow_fs_ships_its_retries_to_workers() -> None:
    """Ray pickles the filesystem to its workers: the retrying wrapper and budget go along."""
    storage = Storage(StorageOptions(endpoint_url="http://127.0.0.1:9", retry_seconds=7))
    fs, _ = storage.arrow_fs("s3://bucket/key")
    handler = pickle.loads(pickle.dumps(fs)).handler
    assert isinstance(handler, RetryingFSSpecHandler) and handler.budget_s == 7
    assert isinstance(handler.fs, StrictS3FileSystem)


def test_distributed_reid_index_survives_s3_outage(
    ray_session, s3_server, tmp_path: Path, monkeypatch, caplog
) -> None:
    """``vbatch reid index --workers 2`` on S3 with the server stopped for 10 s mid-build: it
    commits the whole gallery.

    The outage begins where the issue's build failed: at the first Parquet file the driver opens
    through ``Storage.arrow_fs`` after the scan (the build's "indexing …" log line), so that the
    open itself, not a retried read before it, meets the outage."""
    from tests.index_data import clustered, write_embeddings
    from vbatch.jobs.cli import main

    storage = s3_server.storage()
    bucket = s3_server.new_bucket()
    x, _ = clustered(60, 5, 16, seed=3)
    write_embeddings(tmp_path / "emb", x, n_files=4)
    for f in sorted((tmp_path / "emb").iterdir()):
        storage.put_file(f, join(bucket, "emb", f.name))
    monkeypatch.setenv("VBATCH_IO_RETRY_SECONDS", "120")
    caplog.set_level(logging.INFO, logger="vbatch.operators.index.build")
    times: dict[str, float] = {}
    threads: list[threading.Thread] = []

    def restart() -> None:
        time.sleep(10)  # the outage's length, as in the reproduction
        s3_server.start()
        times["up"] = time.monotonic()

    arrow_fs = Storage.arrow_fs

    def arrow_fs_then_outage(self: Storage, uri: str):
        opened = arrow_fs(self, uri)
        building = any(r.getMessage().startswith("indexing ") for r in caplog.records)
        if building and not threads:
            times["down"] = time.monotonic()
            s3_server.stop()
            threads.append(threading.Thread(target=restart))
            threads[0].start()
        return opened

    monkeypatch.setattr(Storage, "arrow_fs", arrow_fs_then_outage)  # the driver's only
    index = join(bucket, "index")
    argv = ["reid", "index", "--embeddings", join(bucket, "emb"), "--out", index]
    start = time.monotonic()
    try:
        code = main([*argv, "--workers", "2", "--s3-endpoint", s3_server.endpoint])
    finally:
        for t in threads:
            t.join()
    end = time.monotonic()
    assert code == 0
    # the build lived through the outage (else this test tested nothing)
    assert start < times["down"] and end > times["up"]
    info = json.loads(storage.read_bytes(join(index, "index.json")))
    assert info["count"] == len(x) and info["history"][-1]["workers"] == 2


# -- resume reads its staged files like every other storage read -----------------------------------


def test_resume_never_deletes_a_staged_file_it_could_not_read(monkeypatch) -> None:
    """Reads of staged files that fail (throttling, a dropped connection) are retried and the
    files kept; only a file read whole without a Parquet footer is deleted; a store that stays
    down stops the resume with every file still there."""
    from vbatch.jobs.resume import previous_attempt
    from vbatch.operators import storage as storage_module
    from vbatch.operators.tables import STAGING

    out, key = f"s3://staging-{uuid.uuid4().hex[:12]}/out", "run-0123456789abcdef"
    staging = join(out, STAGING, key)
    flaky = _FlakyMemoryFS(fails=lambda path: path.endswith(".parquet"))
    monkeypatch.setattr(storage_module, "_s3", lambda options: flaky)
    storage = Storage(StorageOptions(retry_seconds=60))
    ids = [f"img-{i:02d}" for i in range(12)]
    good = []
    for n in range(3):
        rows = ids[4 * n : 4 * n + 4]
        table = pa.table(
            {
                "image_id": rows,
                "error": pa.nulls(4, pa.string()),
                "error_class": pa.nulls(4, pa.string()),
            }
        )
        buf = io.BytesIO()
        pq.write_table(table, buf)
        good.append(join(staging, f"part-{n}.parquet"))
        storage.write_bytes(good[-1], buf.getvalue())
        if n == 0:
            cut = buf.getvalue()[:-20]  # the writer died before the footer (local disks only)
    storage.write_bytes(join(staging, "part-9.parquet"), cut)

    # each file's first look-up, open and reads fail once: retried, every good file counts
    found = previous_attempt(out, storage, key)
    assert flaky.failures, "no read failed: this tested nothing"
    assert found.files == good and found.rows == 12 and found.dropped == 1
    assert storage.list_files(staging, suffix=".parquet") == good  # only the cut-short one went

    # down for good once the files are listed: the resume stops, nothing is deleted
    down = _FlakyMemoryFS(times=math.inf, fails=lambda path: path.endswith(".parquet"))
    monkeypatch.setattr(storage_module, "_s3", lambda options: down)
    storage.write_bytes(join(staging, "part-9.parquet"), cut)
    with pytest.raises(StorageUnavailableError, match=r"^storage unavailable"):
        previous_attempt(out, Storage(StorageOptions(retry_seconds=0.5)), key)
    monkeypatch.setattr(storage_module, "_s3", lambda options: flaky)
    assert storage.list_files(staging, suffix=".parquet") == [
        *good,
        join(staging, "part-9.parquet"),
    ]
