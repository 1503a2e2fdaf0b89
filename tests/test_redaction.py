"""Signed URLs keep their secrets: ``redact_uri`` on the forms in use, and a ``segment`` run whose
presigned inputs fail in every way leaves their signature in no output but the ``uri`` column."""

from __future__ import annotations

import http.server
import json
import logging
import secrets
import socket
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vbatch.jobs.cli import main
from vbatch.jobs.demo_data import encode, product_image
from vbatch.jobs.failure import describe_failure
from vbatch.jobs.report import page
from vbatch.jobs.summary import emit
from vbatch.operators.redact import MASK, redact_uri, redact_value
from vbatch.operators.storage import (
    StorageUnavailableError,
    describe_read_error,
    with_retries,
)

SIG = "5f0e8c1b2a3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7"

CASES = [
    # AWS SigV4 presigned: signature, credential and session token go; the rest stays
    (
        "https://b.s3.amazonaws.com/k.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Credential=AKIAEXAMPLE%2F20240101%2Fus-east-1%2Fs3%2Faws4_request"
        "&X-Amz-Date=20240101T000000Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host"
        f"&X-Amz-Security-Token=IQoJb3JpZ2luX2VjEJr%2F%2F%2Fabc%3D&X-Amz-Signature={SIG}",
        "https://b.s3.amazonaws.com/k.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        f"&X-Amz-Credential={MASK}&X-Amz-Date=20240101T000000Z&X-Amz-Expires=900"
        f"&X-Amz-SignedHeaders=host&X-Amz-Security-Token={MASK}&X-Amz-Signature={MASK}",
    ),
    # names are case-insensitive
    (f"http://h/a.jpg?x-amz-signature={SIG}", f"http://h/a.jpg?x-amz-signature={MASK}"),
    # SigV2 / CloudFront canned policy: Expires is not a secret
    (
        "https://s3.amazonaws.com/b/k?AWSAccessKeyId=AKIAEXAMPLE&Expires=1700000000&Signature=a%2Bb%3D",
        f"https://s3.amazonaws.com/b/k?AWSAccessKeyId={MASK}&Expires=1700000000&Signature={MASK}",
    ),
    # CloudFront custom policy
    (
        "https://d1.cloudfront.net/a.jpg?Policy=eyJTdGF0ZW1lbnQiOlt7~&Signature=Nq~x-_Y"
        "&Key-Pair-Id=K2JCJMDEHXQW5F",
        f"https://d1.cloudfront.net/a.jpg?Policy={MASK}&Signature={MASK}&Key-Pair-Id={MASK}",
    ),
    # Azure SAS: only sig is the secret
    (
        "https://acct.blob.core.windows.net/c/a.jpg?sv=2022-11-02&sp=r"
        "&se=2024-01-01T00:00:00Z&sig=AbC%2Bdef%3D",
        "https://acct.blob.core.windows.net/c/a.jpg?sv=2022-11-02&sp=r"
        f"&se=2024-01-01T00:00:00Z&sig={MASK}",
    ),
    # GCS V4 signed URL
    (
        "https://storage.googleapis.com/b/a.jpg?X-Goog-Algorithm=GOOG4-RSA-SHA256"
        "&X-Goog-Credential=sa%40p.iam.gserviceaccount.com%2F20240101&X-Goog-Signature=0a1b2c",
        "https://storage.googleapis.com/b/a.jpg?X-Goog-Algorithm=GOOG4-RSA-SHA256"
        f"&X-Goog-Credential={MASK}&X-Goog-Signature={MASK}",
    ),
    # tokens in queries, before a fragment, after a ';'
    ("https://x/y?access_token=abc#frag", f"https://x/y?access_token={MASK}#frag"),
    ("https://x/y?a=1;token=abc", f"https://x/y?a=1;token={MASK}"),
    # the password of userinfo; the user name stays
    ("https://user:s3cr3t@host/a.jpg", f"https://user:{MASK}@host/a.jpg"),
    ("ftp://u:p%40ss@h:21/x", f"ftp://u:{MASK}@h:21/x"),
    # a signed URL inside another URL's query (percent-encoded)
    (
        "https://proxy/fetch?u=https%3A%2F%2Fh%2Fa%3FX-Amz-Signature%3Dabc%26X-Amz-Expires%3D9",
        f"https://proxy/fetch?u=https%3A%2F%2Fh%2Fa%3FX-Amz-Signature%3D{MASK}%26X-Amz-Expires%3D9",
    ),
    # HTML-escaped
    ("http://x/a?b=2&amp;Signature=abc&amp;c=3", f"http://x/a?b=2&amp;Signature={MASK}&amp;c=3"),
    # inside message text: quotes, brackets, JSON, a colon or full stop after the URL
    (
        f"cannot read http://h/a.jpg?X-Amz-Signature={SIG}: ClientResponseError: 403, "
        f"message='Forbidden', url='http://h/a.jpg?X-Amz-Signature={SIG}&X-Amz-Expires=5'",
        f"cannot read http://h/a.jpg?X-Amz-Signature={MASK}: ClientResponseError: 403, "
        f"message='Forbidden', url='http://h/a.jpg?X-Amz-Signature={MASK}&X-Amz-Expires=5'",
    ),
    ("URL('http://x/a?sig=abc')", f"URL('http://x/a?sig={MASK}')"),
    ('{"error": "http://x/a?token=abc"}', f'{{"error": "http://x/a?token={MASK}"}}'),
    ("see <http://x/a?sig=abc>.", f"see <http://x/a?sig={MASK}>."),
    ("fetch http://x/a?sig=abc.", f"fetch http://x/a?sig={MASK}."),
    # nothing to redact: left exactly as it was
    ("s3://bucket/dir/a.jpg", "s3://bucket/dir/a.jpg"),
    ("s3://bucket/a:b@c.jpg", "s3://bucket/a:b@c.jpg"),
    ("http://host:8080/a@b.jpg", "http://host:8080/a@b.jpg"),
    # other parameters whose names merely contain a secret's name
    (
        "http://x/a?continuation-token=abc&signatures=2&mykey=1",
        "http://x/a?continuation-token=abc&signatures=2&mykey=1",
    ),
    ("object not found: /data/a=b.jpg", "object not found: /data/a=b.jpg"),
    ("", ""),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_redact_uri(text: str, expected: str) -> None:
    assert redact_uri(text) == expected
    assert redact_uri(expected) == expected  # idempotent


def test_redact_value_walks_records() -> None:
    record = {
        "rows": 3,
        "error": "X: http://h/a?sig=abc",
        "sample_errors": [{"id": "a", "error": "object not found: http://h/a?token=t"}],
        "pair": ("http://u:pw@h/", None),
    }
    assert redact_value(record) == {
        "rows": 3,
        "error": f"X: http://h/a?sig={MASK}",
        "sample_errors": [{"id": "a", "error": f"object not found: http://h/a?token={MASK}"}],
        "pair": (f"http://u:{MASK}@h/", None),
    }


def test_error_texts_and_logs_are_redacted(caplog, capsys) -> None:
    url = f"https://h/a.jpg?X-Amz-Signature={SIG}"
    for error in (
        FileNotFoundError(url),
        PermissionError(f"403 Forbidden {url}"),
        OSError(f"HTTP 400 for url '{url}'"),
    ):
        assert SIG not in describe_read_error(error, url)
        assert MASK in describe_read_error(error, url)

    def down() -> None:
        raise ConnectionResetError(f"Connection reset by peer, url={url}")

    with caplog.at_level(logging.WARNING), pytest.raises(StorageUnavailableError) as raised:
        # a budget over the first backoff (at most 0.5 s, jittered): the first retry always happens
        with_retries(down, f"read {url}", budget_s=1.0)
    assert SIG not in str(raised.value) and MASK in str(raised.value)
    assert "retrying" in caplog.text and SIG not in caplog.text
    assert SIG not in describe_failure(RuntimeError(f"boom {url}"))
    assert SIG not in page.esc(url) and MASK in page.esc(url)
    emit({"error": f"ValueError: {url}", "sample_errors": [{"error": url}]}, "-")
    assert SIG not in capsys.readouterr().out


# -- a segment run over failing presigned URLs --------------------------------------------------


class _Presigned(http.server.BaseHTTPRequestHandler):
    """``/ok/…`` serves the image, ``/403/…``, ``/404/…`` and ``/500/…`` answer that status,
    whatever the query (a real store would check the signature)."""

    image = b""

    def do_GET(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        status = path.split("/")[1]
        if status == "ok":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(self.image)))
            self.end_headers()
            self.wfile.write(self.image)
            return
        self.send_error(int(status))

    do_HEAD = do_GET

    def log_message(self, *args: object) -> None:
        pass  # the request lines (with their query) would land in this test's own stderr


@pytest.fixture()
def presigned_server() -> Iterator[str]:
    _Presigned.image = encode(product_image(7, (48, 40)))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Presigned)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def salient_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vbatch.models.salient.modeldir import write_random_model_dir

    return write_random_model_dir(tmp_path_factory.mktemp("salient"), norm_size=(64, 64))


def _refused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again: connecting is refused


def _ray_logs() -> Path:
    import ray

    return Path(ray._private.worker._global_node.get_logs_dir_path())


def test_presigned_secrets_appear_in_no_output_but_the_uri_column(
    ray_session, presigned_server: str, tmp_path: Path, salient_dir: Path, monkeypatch, capfd
) -> None:
    signature = secrets.token_hex(32)
    token = "IQoJ" + secrets.token_hex(24)
    key_id = "AKIA" + secrets.token_hex(8).upper()
    query = (
        f"?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={key_id}%2F20240101%2Fus-east-1"
        "%2Fs3%2Faws4_request&X-Amz-Date=20240101T000000Z&X-Amz-Expires=900"
        f"&X-Amz-SignedHeaders=host&X-Amz-Security-Token={token}&X-Amz-Signature={signature}"
    )
    uris = {
        "ok": f"{presigned_server}/ok/a.jpg{query}",
        "forbidden": f"{presigned_server}/403/b.jpg{query}",
        "missing": f"{presigned_server}/404/c.jpg{query}",
        "failing": f"{presigned_server}/500/d.jpg{query}",
        "refused": f"http://127.0.0.1:{_refused_port()}/e.jpg{query}",
    }
    pq.write_table(
        pa.table({"image_id": list(uris), "uri": list(uris.values())}),
        tmp_path / "manifest.parquet",
    )
    monkeypatch.setenv("VBATCH_IO_RETRY_SECONDS", "2")  # the 500s and the refusals give up soon
    out = tmp_path / "out"
    logs = _ray_logs()
    before = {p: p.stat().st_size for p in logs.rglob("*") if p.is_file()}
    argv = ["segment", "--task", "salient", "--manifest", str(tmp_path / "manifest.parquet")]
    argv += ["--model-dir", str(salient_dir), "--out", str(out), "--summary-json", "-"]
    # four of five rows fail, two of them for the infrastructure: published all the same here
    argv += ["--max-error-rate", "1", "--max-infra-error-rate", "1"]
    assert main(argv) == 0
    secrets_ = (signature, token, key_id)

    table = pq.read_table(out / "results")
    got = {r["image_id"]: r for r in table.to_pylist()}
    assert got["ok"]["status"] == "ok"
    assert got["forbidden"]["error_class"] == "fetch" and "403" in got["forbidden"]["error"]
    assert got["missing"]["error_class"] == "not_found"
    assert got["failing"]["error_class"] == got["refused"]["error_class"] == "infrastructure"
    # the uri column keeps the user's own value (and so shows that the search below can find them)
    assert all(signature in got[i]["uri"] and token in got[i]["uri"] for i in uris)
    for image_id, row in got.items():
        shown = {k: v for k, v in row.items() if k != "uri"}
        assert not any(s in str(shown) for s in secrets_), (image_id, shown)
        if row["error"]:
            assert "X-Amz-Signature" not in row["error"] or MASK in row["error"], row["error"]

    # no other file under --out holds them: run.json, _SUCCESS, the report, the masks
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {"run.json", "_SUCCESS", "index.html"} <= {p.name for p in files}
    for path in files:
        if path.suffix == ".parquet":
            other = pq.read_table(path)
            other = other.drop_columns([c for c in ("uri",) if c in other.column_names])
            text = json.dumps(other.to_pylist(), default=str)
        else:
            text = path.read_bytes().decode("latin-1")
        assert not any(s in text for s in secrets_), path
    report = (out / "report" / "index.html").read_text()
    assert f"X-Amz-Signature={MASK}" in report  # the inputs' URIs are shown, redacted

    # nor the job's stdout and stderr, nor what its Ray workers logged (the retry warnings)
    captured = capfd.readouterr()
    assert not any(s in captured.out + captured.err for s in secrets_)
    record = json.loads(captured.out.strip().splitlines()[-1])
    assert record["by_error_class"]["infrastructure"] == 2
    worker_logs = ""
    for p in logs.rglob("*"):
        if p.is_file() and not p.name.endswith((".sock", ".lock")):
            with open(p, "rb") as f:
                f.seek(before.get(p, 0))
                worker_logs += f.read().decode("latin-1")
    assert f"X-Amz-Signature={MASK}" in worker_logs  # the workers did log the retries
    assert not any(s in worker_logs for s in secrets_)
