"""Storage faults: unsupported and http(s) URIs, transient errors retried, outages survived.

The S3 outage test stops the session's SeaweedFS server while a job runs and starts it again on the
same ports and data folder: the job must end with every image ``ok``.
"""

from __future__ import annotations

import errno
import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vbatch.jobs.demo_data import encode, product_image
from vbatch.jobs.segment import ImageJobConfig, run_image_job
from vbatch.operators.storage import (
    Storage,
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
