"""What the video job says about bad inputs: files decord cannot open, queries the text encoder
cannot take, unsupported URIs, http(s) videos that cannot be fetched, relative ``file://`` URIs,
and query texts the overlay font cannot draw."""

from __future__ import annotations

import functools
import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pytest

from tests.video_data import boxes, fast_start
from vbatch.operators.cache import localize_video
from vbatch.operators.manifest import ERROR, ROW
from vbatch.operators.storage import Storage, StorageOptions, describe_read_error
from vbatch.operators.video.columns import QUERY_ERRORS, WINDOW
from vbatch.operators.video.container import container_problem, describe_video_error, probe_video
from vbatch.operators.video.decode import read_window
from vbatch.operators.video.plan import plan_video_windows
from vbatch.operators.video.queries import all_query_errors, rvos_query_check, valid_queries
from vbatch.operators.video.render import overlay_text
from vbatch.schemas.videos import video_row_errors


def mp4(path: Path, frames: int = 25) -> bytes:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 24, (40, 32))
    for t in range(frames):
        writer.write(np.full((32, 40, 3), t * 5, np.uint8))
    writer.release()
    return path.read_bytes()


@pytest.fixture(scope="module")
def bad_videos(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    good = mp4(root / "good.mp4")
    layout = boxes(good)
    assert list(layout) == ["ftyp", "free", "mdat", "moov"]  # OpenCV writes the index last
    files = {
        "empty": b"",
        "text": b"video_id,uri\nwalk,walk.mp4\n" * 10,
        "cut-in-mdat": good[: layout["mdat"][0] + 100],  # a recording cut before its index
        "cut-in-moov": good[: layout["moov"][0] + 50],
        "garbage-after-header": good[:64] + bytes(range(256)) * 8,
        # the index first, then the file cut inside the frames: decord says "av_read_frame failed"
        "fast-start-cut": fast_start(good)[: -layout["mdat"][1] // 2],
        "random": bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
    }
    out = {"good": root / "good.mp4"}
    for name, data in files.items():
        (root / f"{name}.mp4").write_bytes(data)
        out[name] = root / f"{name}.mp4"
    return out


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("empty", "empty file (0 bytes)"),
        ("text", "not a video container (the file starts with text: 'video_id,uri"),
        ("cut-in-mdat", "truncated: moov atom missing (the file ends inside the 'mdat' box"),
        ("cut-in-moov", "truncated: moov atom incomplete"),
        ("garbage-after-header", "corrupt: unreadable box at byte"),
        ("fast-start-cut", "truncated: the file ends inside the 'mdat' box, at byte"),
        ("random", "not a video container (unknown magic bytes"),
    ],
)
def test_unreadable_videos_say_why(bad_videos: dict[str, Path], name: str, message: str) -> None:
    path = str(bad_videos[name])
    with pytest.raises(Exception) as err:  # decord's own text says only "Error reading <path>"
        probe_video(path)
    text = describe_video_error(err.value, "s3://b/v.mp4", path)
    assert text.startswith("cannot read video s3://b/v.mp4: ") and message in text, text


def test_a_good_video_shows_no_problem(bad_videos: dict[str, Path], tmp_path: Path) -> None:
    assert container_problem(str(bad_videos["good"])) is None
    assert probe_video(str(bad_videos["good"])).num_frames == 25
    fast = tmp_path / "fast.mp4"  # the helper's fast-start file is a good video
    fast.write_bytes(fast_start(bad_videos["good"].read_bytes()))
    assert list(boxes(fast.read_bytes())) == ["ftyp", "moov", "mdat"]
    assert container_problem(str(fast)) is None
    assert np.array_equal(
        read_window(str(fast), 0, 25), read_window(str(bad_videos["good"]), 0, 25)
    )
    # a download that failed (no local file) keeps the storage layer's message
    assert describe_video_error(FileNotFoundError("x"), "s3://b/v.mp4", None) == (
        "object not found: s3://b/v.mp4"
    )


@pytest.mark.parametrize("uri", ["hdfs://nn/a.mp4", "gs://bucket/a.mp4", "ftp://h/a"])
def test_an_unsupported_uri_is_that_video_s_error_row(tmp_path: Path, uri: str) -> None:
    assert video_row_errors(["v"], [uri], [["q"]]) == [None]  # the schema takes it as a string
    good = tmp_path / "good.mp4"
    mp4(good)
    batch = pa.table(
        {
            "video_id": ["v", "w"],
            "uri": [uri, "good.mp4"],
            "queries": pa.array([["q"], ["q"]], pa.list_(pa.string())),
            "start_s": pa.array([None, None], pa.float64()),
            "end_s": pa.array([None, None], pa.float64()),
            ROW: pa.array([0, 1], pa.int64()),
            ERROR: pa.array([None, None], pa.string()),
            QUERY_ERRORS: pa.array([[None], [None]], pa.list_(pa.string())),
        }
    )
    plan = plan_video_windows(batch, storage=Storage(), base_uri=str(tmp_path))
    rows = plan.to_pylist()
    assert rows[0]["uri"] == uri and rows[0][WINDOW] is None
    assert rows[0][ERROR].startswith(f"cannot resolve video uri {uri!r}: "), rows[0][ERROR]
    assert [r[WINDOW] for r in rows[1:]] == [0, 1] and all(r[ERROR] is None for r in rows[1:])


# -- http(s) --------------------------------------------------------------------------------------
class _Handler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.startswith("/down/"):
            self.send_error(503, "slow down")
        elif self.path.startswith("/private/"):
            self.send_error(403, "forbidden")
        else:
            super().do_GET()

    do_HEAD = do_GET  # fsspec looks a file up with HEAD first

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def http_url(bad_videos: dict[str, Path]) -> Iterator[str]:
    """A plain HTTP server on the folder of ``bad_videos``; ``https://`` to it fails its TLS."""
    directory = str(bad_videos["good"].parent)
    handler = functools.partial(_Handler, directory=directory)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http_videos_fail_as_images_do(http_url: str, bad_videos: dict[str, Path]) -> None:
    """Fetching a video goes through the store's own answer: fsspec's HTTP look-up calls every
    failure "not found", which made a 503, a 403 or a TLS error an `object not found` row that was
    never retried. A video's row now says what an image's row says for the same URL."""
    storage = Storage(StorageOptions(retry_seconds=1.0))
    good = f"http://{http_url}/good.mp4"
    assert probe_video(localize_video(storage, good)).num_frames == 25
    cases = {
        f"http://{http_url}/nope.mp4": "object not found: http://",
        f"http://{http_url}/private/good.mp4": "ClientResponseError: 403",
        f"http://{http_url}/down/good.mp4": "storage unavailable after",  # retried, then infra
        f"https://{http_url}/good.mp4": "SSL",  # a TLS handshake with a plain HTTP server
    }
    for uri, fragment in cases.items():
        with pytest.raises(Exception) as video_err:
            localize_video(storage, uri)
        with pytest.raises(Exception) as image_err:
            storage.read_bytes(uri)
        video_text = describe_video_error(video_err.value, uri, None)
        image_text = describe_read_error(image_err.value, uri, what="video ")
        assert fragment in video_text, video_text
        if "storage unavailable" in fragment:  # (the retry counts differ)
            assert image_text.startswith("storage unavailable after"), image_text
        else:
            assert video_text == image_text


def test_http_and_relative_file_uris_in_the_plan(
    http_url: str, bad_videos: dict[str, Path]
) -> None:
    """The plan stage: an http video runs, a failing https one is that video's error row, and a
    relative ``file://`` uri names a file next to the manifest, not in the worker's directory."""
    root = bad_videos["good"].parent
    uris = [
        f"http://{http_url}/good.mp4",
        f"https://{http_url}/good.mp4",
        f"file://{root.name}/good.mp4",  # relative to the manifest's folder, root's parent
        f"file://{root.name}/fast-start-cut.mp4",
    ]
    n = len(uris)
    batch = pa.table(
        {
            "video_id": [f"v{i}" for i in range(n)],
            "uri": uris,
            "queries": pa.array([["q"]] * n, pa.list_(pa.string())),
            "start_s": pa.array([None] * n, pa.float64()),
            "end_s": pa.array([None] * n, pa.float64()),
            ROW: pa.array(range(n), pa.int64()),
            ERROR: pa.array([None] * n, pa.string()),
            QUERY_ERRORS: pa.array([[None]] * n, pa.list_(pa.string())),
        }
    )
    assert os.getcwd() != str(root.parent)
    storage = Storage(StorageOptions(retry_seconds=1.0))
    rows = plan_video_windows(batch, storage=storage, base_uri=str(root.parent)).to_pylist()
    by_video: dict[str, list[dict]] = {}
    for r in rows:
        by_video.setdefault(r["video_id"], []).append(r)
    assert [r[WINDOW] for r in by_video["v0"]] == [0, 1] and by_video["v0"][0][ERROR] is None
    assert [r[WINDOW] for r in by_video["v2"]] == [0, 1] and by_video["v2"][0][ERROR] is None
    assert by_video["v2"][0]["uri"] == str(root / "good.mp4")
    (https,) = by_video["v1"]
    assert https[WINDOW] is None and https[ERROR].startswith(f"cannot read video {uris[1]}: ")
    assert "SSL" in https[ERROR], https[ERROR]
    (cut,) = by_video["v3"]
    size = bad_videos["fast-start-cut"].stat().st_size
    whole = len(fast_start(bad_videos["good"].read_bytes()))  # mdat is the last box
    assert cut[ERROR] == (
        f"cannot read video {root / 'fast-start-cut.mp4'}: truncated: the file ends inside the "
        f"'mdat' box, at byte {size} of {whole}"
    )


# -- queries ----------------------------------------------------------------------------------------
def test_queries_longer_than_the_text_encoder_fail_alone(rvos_dir: Path) -> None:
    check = rvos_query_check(rvos_dir)
    long = "a red ball " * 200  # 600+ tokens with the tiny tokenizer, 600 with roberta-base's
    errors = all_query_errors([["a dog", long, ""], [long], None, ["🚲"]], check)
    assert errors[0][0] is None and errors[0][2] == "query is empty"
    assert errors[0][1] is not None and "the text encoder takes at most 512" in errors[0][1]
    assert errors[1] == [errors[0][1]] and errors[2] == [] and errors[3] == [None]
    assert valid_queries(["a dog", long, ""], errors[0]) == [(0, "a dog")]
    # a manifest without a single runnable query is no problem for the check
    assert check([]) == [] and all_query_errors([[""], None, [None]], check) == [
        ["query is empty"],
        [],
        ["query is null"],
    ]
    # exactly at the limit runs, one token more does not (<s> and </s> count)
    tok = __import__("vbatch.models.rvos.text", fromlist=["load_tokenizer"]).load_tokenizer(
        rvos_dir / "transformer_cfg_dir"
    )
    word = "dog "
    per = len(tok("dog dog")["input_ids"]) - len(tok("dog")["input_ids"])
    n = (512 - len(tok("dog")["input_ids"])) // per + 1
    at_limit = (word * n).strip()
    assert len(tok(at_limit)["input_ids"]) <= 512
    over = at_limit + " dog" * (512 - len(tok(at_limit)["input_ids"]) + 1)
    assert len(tok(over)["input_ids"]) > 512
    assert check([at_limit, over])[0] is None and check([at_limit, over])[1] is not None


def test_the_predictor_refuses_a_long_query_by_name(rvos_dir: Path) -> None:
    from vbatch.models import load_model

    predictor = load_model("rvos", rvos_dir, device="cpu")
    frames = np.zeros((2, 32, 40, 3), np.uint8)
    with pytest.raises(
        ValueError, match=r"query 1 has \d+ tokens; the text encoder takes at most 512"
    ):
        predictor.predict_window(frames, ["a dog", "a dog " * 400])


# -- overlays ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("query", "shown"),
    [
        ("a person riding a 🚲", "a person riding a [bicycle]"),
        ("the 🐕‍🦺 on the left 👍🏽", "the [dog][safety vest] on the left [thumbs up sign]"),
        ("café crème", "cafe creme"),
        ("猫 near кот", "[U+732B] near [U+043A][U+043E][U+0442]"),
        ("plain ASCII: (x) 100% ~ok~", "plain ASCII: (x) 100% ~ok~"),
    ],
)
def test_overlay_text_keeps_ascii_and_shows_what_it_cannot_draw(query: str, shown: str) -> None:
    got = overlay_text(query)
    assert got == shown
    assert got.isascii() and all(32 <= ord(c) < 127 for c in got)  # Hershey's repertoire
    ascii_part = [c for c in query if c.isascii()]
    it = iter(got)
    assert all(c in it for c in ascii_part)  # every ASCII character survives, in order
    assert "?" not in got or "?" in query


def test_pngs_still_decode_after_a_video_was_opened(bad_videos: dict[str, Path]) -> None:
    """In a fresh process (as a reused Ray worker): open a video, then read a mask PNG."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from vbatch.operators.video.container import probe_video\n"
        "probe_video(sys.argv[1])\n"
        "import cv2\n"
        "ok, png = cv2.imencode('.png', np.full((4, 4), 255, np.uint8))\n"
        "assert ok and cv2.imdecode(png, cv2.IMREAD_GRAYSCALE) is not None, 'PNG broken'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(bad_videos["good"])], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
