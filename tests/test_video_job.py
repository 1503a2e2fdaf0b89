"""The `video` job (MTTR, tiny config) end to end on the shared Ray instance, locally and on S3.

One manifest holds short synthetic videos next to every kind of bad row; the tests check one row per
(video, query, frame), the written masks against ``predict_video`` on the same decoded frames, the
error rows, and that a long video is decoded window by window.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import cv2
import decord
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.video_data import boxes, fast_start
from vbatch.jobs.publish import read_table
from vbatch.jobs.video import VideoConfig, run_video
from vbatch.models import load_model
from vbatch.models.rvos import owned_frames, plan_windows
from vbatch.operators.manifest import ERROR, ROW
from vbatch.operators.outputs import safe_name
from vbatch.operators.storage import Storage, join
from vbatch.operators.tables import commit_record
from vbatch.operators.video.columns import (
    FRAMES,
    OWN_START,
    OWN_STOP,
    QUERY_ERRORS,
    START,
    STOP,
    WINDOW,
)
from vbatch.operators.video.decode import decode_windows, read_window, resize_frames
from vbatch.operators.video.plan import plan_video_windows
from vbatch.schemas.videos import ManifestError, validate_video_results

SIZE = (40, 32)  # (width, height), not square; the network sees every frame at 450x360 anyway
FPS = 24


def synthetic_video(path: Path, num_frames: int, seed: int, size: tuple[int, int] = SIZE) -> Path:
    """A short mp4v clip: two coloured shapes moving over a noisy background."""
    w, h = size
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (w, h))
    assert writer.isOpened()
    bg = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
    for t in range(num_frames):
        frame = bg.copy()
        cv2.circle(frame, ((5 + t) % w, h // 2), h // 5, (0, 0, 230), -1)
        cv2.rectangle(frame, (w - 20, (2 * t) % h), (w - 5, (2 * t) % h + 12), (20, 220, 20), -1)
        writer.write(frame)
    writer.release()
    assert len(decord.VideoReader(str(path))) == num_frames  # decord reads what cv2 wrote
    return path


def decode_all(path: str) -> np.ndarray:
    vr = decord.VideoReader(path)
    return vr.get_batch(list(range(len(vr)))).asnumpy()


# video_id, file, queries, start_s, end_s, expected: {query_index: "ok" | error fragment} or a
# fragment for a single row without a query
CASES = [
    ("walk", "walk.mp4", ["a red ball", "the green box"], None, None, {0: "ok", 1: "ok"}),
    ("ride", "ride.mp4", ["A person   riding a bike", "  "], None, None, {0: "ok", 1: "query is empty"}),
    ("ride/clip", "ride.mp4", ["the ball"], 0.5, 1.25, {0: "ok"}),  # frames 12-29
    ("missing", "not-there.mp4", ["a dog"], None, None, {0: "object not found"}),
    ("corrupt", "corrupt.mp4", ["a", "b"], None, None, {0: "cannot read video", 1: "cannot read video"}),
    ("no-queries", "walk.mp4", [], None, None, "queries is empty"),
    ("walk", "ride.mp4", ["dup"], None, None, {0: "duplicate video_id 'walk'"}),
    ("bad-range", "walk.mp4", ["x"], 2.0, 1.0, {0: "start_s (2.0) must be before end_s (1.0)"}),
]  # fmt: skip
# 25 and 43 frames: 2 and 3 windows, the last ones short (the tiny model costs ~1 s/window)
FRAMES_OF = {"walk.mp4": 25, "ride.mp4": 43}


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("videos")
    files = {
        name: synthetic_video(root / name, n, seed=i).read_bytes()
        for i, (name, n) in enumerate(FRAMES_OF.items())
    }
    good = files["walk.mp4"]
    files["corrupt.mp4"] = good[:64] + bytes(range(256)) * 8  # a valid header, then garbage
    return files


@pytest.fixture(scope="module")
def expected_masks(rvos_dir: Path, videos: dict[str, bytes], tmp_path_factory) -> dict:
    """predict_video on the frames decord decodes, per ok (video_id, query_index): (frames, H, W)."""
    root = tmp_path_factory.mktemp("decoded")
    predictor = load_model("rvos", rvos_dir, device="cpu")
    out = {}
    for vid, name, queries, start, end, expect in CASES:
        if not isinstance(expect, dict) or "ok" not in expect.values() or vid in out:
            continue
        (root / name).write_bytes(videos[name])
        frames = decode_all(str(root / name))
        lo = 0 if start is None else round(start * FPS)
        hi = len(frames) if end is None else round(end * FPS)
        ok = [qi for qi, e in expect.items() if e == "ok"]
        masks = predictor.predict_video(frames[lo:hi], [queries[qi] for qi in ok])
        for j, qi in enumerate(ok):
            out[vid, qi] = (lo, masks[j])
    return out


def write_inputs(storage: Storage, root: str, videos: dict[str, bytes]) -> str:
    for name, data in videos.items():
        storage.write_bytes(join(root, "videos", name), data)
    table = pa.table(
        {
            "video_id": [c[0] for c in CASES],
            "uri": [f"videos/{c[1]}" for c in CASES],
            "queries": pa.array([c[2] for c in CASES], pa.list_(pa.string())),
            "start_s": pa.array([c[3] for c in CASES], pa.float32()),
            "end_s": [c[4] for c in CASES],
            "camera": list(range(len(CASES))),  # other columns are ignored
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(join(root, "manifest.parquet"), buf.getvalue())
    return join(root, "manifest.parquet")


def check_results(storage: Storage, out: str, expected_masks: dict) -> None:
    table = read_table(out if out.endswith("results") else join(out, "results"), storage)
    validate_video_results(table)
    # frames live in the folders of the runs that wrote them (one for a fresh run; a resumed run
    # keeps the crashed attempt's too), which the commit record names
    out = out[: -len("/results")] if out.endswith("/results") else out
    roots = [join(out, d) for d in (commit_record(out, storage) or {})["product_dirs"]]
    assert all(r.startswith(join(out, "products") + "/") for r in roots) and roots
    rows = table.to_pylist()
    by_row: dict[int, list[dict]] = {}
    for r in rows:
        by_row.setdefault(r["manifest_row"], []).append(r)
    assert sorted(by_row) == list(range(len(CASES)))  # every manifest row accounted for
    for m, (vid, _name, queries, _start, _end, expect) in enumerate(CASES):
        got = by_row[m]
        assert {r["video_id"] for r in got} == {vid}
        if isinstance(expect, str):  # no queries: exactly one row, without a query
            assert len(got) == 1 and got[0]["query_index"] is None and got[0]["status"] == "error"
            assert expect in got[0]["error"], got[0]["error"]
            continue
        assert {r["query_index"] for r in got} == set(expect)
        for qi, status in expect.items():
            q_rows = [r for r in got if r["query_index"] == qi]
            assert all(r["query"] == queries[qi] for r in q_rows)
            if status != "ok":
                assert len(q_rows) == 1, q_rows
                r = q_rows[0]
                assert r["status"] == "error" and r["frame_index"] is None and r["mask_uri"] is None
                assert status in r["error"], r["error"]
                continue
            lo, masks = expected_masks[vid, qi]
            frames = sorted(r["frame_index"] for r in q_rows)
            assert frames == list(range(lo, lo + len(masks)))  # one row per frame, none twice
            for r in q_rows:
                assert r["status"] == "ok" and r["error"] is None
                assert r["timestamp_s"] == pytest.approx(r["frame_index"] / FPS, abs=1e-3)
                # a relative name: storage's join makes a relative first part absolute (cwd)
                name = "/".join(("frames", safe_name(vid), str(qi), f"{r['frame_index']}.png"))
                assert r["mask_uri"] in {join(root, name) for root in roots}
                png = cv2.imdecode(
                    np.frombuffer(storage.read_bytes(r["mask_uri"]), np.uint8),
                    cv2.IMREAD_UNCHANGED,
                )
                want = masks[r["frame_index"] - lo]
                assert png.dtype == np.uint8 and png.shape == (SIZE[1], SIZE[0])
                assert set(np.unique(png)) <= {0, 255}
                # the pipeline's frames are predict_video's frames, decided by the same windows
                assert np.array_equal(png, want), (vid, qi, r["frame_index"])
    assert {r["model_version"] for r in rows if r["status"] == "ok"} != {None}


def test_video_local_paths(ray_session, tmp_path: Path, rvos_dir, videos, expected_masks) -> None:
    storage = Storage()
    manifest = write_inputs(storage, str(tmp_path / "in"), videos)
    out = str(tmp_path / "out")
    summary = run_video(VideoConfig(manifest, str(rvos_dir), out, render=True))
    check_results(storage, out, expected_masks)
    assert (summary.videos, summary.videos_ok, summary.videos_error) == (len(CASES), 2, 6)
    assert summary.frames == 25 + 43 + 18 and summary.rows_ok == 2 * 25 + 43 + 18
    frames = tmp_path / "out" / "products" / summary.record["run_id"] / "frames"
    assert "ride/clip" not in os.listdir(frames)  # ids are safe names
    assert summary.renders == 3
    report = summary.report()
    assert report.startswith(f"rvos: {len(CASES)} videos — 2 ok, 6 with errors — 86 frames")
    assert f"renders: 3 under {out}/renders" in report.splitlines()
    render = decord.VideoReader(str(tmp_path / "out" / "renders" / "walk.mp4"))
    assert len(render) == 25 and render[0].shape[1] == SIZE[0]


def test_video_on_s3_and_rerun(ray_session, s3_server, rvos_dir, videos, expected_masks) -> None:
    storage = s3_server.storage()
    bucket = s3_server.new_bucket()
    manifest = write_inputs(storage, join(bucket, "in"), videos)
    model_uri = join(bucket, "models", "rvos")
    for f in rvos_dir.rglob("*"):
        if f.is_file():
            storage.put_file(f, join(model_uri, str(f.relative_to(rvos_dir))))
    out = join(bucket, "out")
    cfg = VideoConfig(manifest, model_uri, out, s3_endpoint=s3_server.endpoint, batch_size=2)
    summary = run_video(cfg)
    check_results(storage, out, expected_masks)
    first = storage.list_files(join(out, "results"))
    assert len(storage.list_files(join(out, "products"))) == summary.rows_ok
    # a repeated run (here on the first video only, to keep the test short) replaces the results
    again = run_video(replace(cfg, limit=1))
    assert (again.videos, again.videos_ok, again.rows_ok) == (1, 1, 2 * 25)
    table = read_table(join(out, "results"), storage)
    assert set(table.column("video_id").to_pylist()) == {"walk"} and table.num_rows == 2 * 25
    assert not set(first) & set(storage.list_files(join(out, "results")))
    # the first run's frames went with its generation: only the rerun's remain, in its folder
    frames = storage.list_files(join(out, "products"))
    assert len(frames) == again.rows_ok
    assert all(f"/products/{again.record['run_id']}/frames/" in f for f in frames)


def test_manifest_missing_column_fails_fast(ray_session, tmp_path: Path, rvos_dir) -> None:
    pq.write_table(pa.table({"video_id": ["a"], "uri": ["a.mp4"]}), tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match=r"m\.parquet: missing required column 'queries'"):
        run_video(VideoConfig(str(tmp_path / "m.parquet"), str(rvos_dir), str(tmp_path / "o")))


def test_long_video_is_decoded_window_by_window(tmp_path: Path) -> None:
    """The CPU stages of a 130-frame video: the plan decodes no window, each decode call one window."""
    path = synthetic_video(tmp_path / "long.mp4", 130, seed=3)
    manifest = pa.table(
        {
            "video_id": ["long"],
            "uri": ["long.mp4"],
            "queries": pa.array([["q"]], pa.list_(pa.string())),
            "start_s": pa.array([None], pa.float64()),
            "end_s": pa.array([None], pa.float64()),
            "gt_mask_dir": pa.array([None], pa.string()),
            ROW: pa.array([0], pa.int64()),
            ERROR: pa.array([None], pa.string()),
            QUERY_ERRORS: pa.array([[None]], pa.list_(pa.string())),
        }
    )
    plan = plan_video_windows(manifest, storage=Storage(), base_uri=str(tmp_path))
    windows = plan_windows(130)
    assert len(windows) == 8
    assert plan.column(WINDOW).to_pylist() == list(range(8))
    assert (
        list(zip(plan.column(START).to_pylist(), plan.column(STOP).to_pylist(), strict=True))
        == windows
    )
    owned = list(
        zip(plan.column(OWN_START).to_pylist(), plan.column(OWN_STOP).to_pylist(), strict=True)
    )
    assert owned == owned_frames(windows)

    calls: list[int] = []

    def spy(p: str, start: int, stop: int) -> np.ndarray:
        frames = read_window(p, start, stop)
        calls.append(frames.shape[0])
        return frames

    whole = decode_all(str(path))
    for k in range(plan.num_rows):  # the job runs this stage with one window per batch
        out = decode_windows(plan.slice(k, 1), storage=Storage(), reader=spy)
        assert out.column(ERROR).to_pylist() == [None]
        got = np.load(io.BytesIO(out.column(FRAMES)[0].as_py()))
        s, e = windows[k]
        assert np.array_equal(got, resize_frames(whole[s:e]))  # seeking decodes the same frames
    assert calls == [e - s for s, e in windows] and max(calls) == 24


@pytest.mark.parametrize("n", [1, 5, 18, 24, 25, 42, 43, 100, 1000])
def test_each_frame_owned_by_the_last_window_containing_it(n: int) -> None:
    windows = plan_windows(n)
    owned = owned_frames(windows)
    frames = [f for a, b in owned for f in range(a, b)]
    assert frames == list(range(n))  # every frame written exactly once
    for f in range(n):
        last = max(k for k, (s, e) in enumerate(windows) if s <= f < e)
        a, b = owned[last]
        assert a <= f < b


# -- every bad kind at once, through the CLI -------------------------------------------------------
LONG_QUERY = "the small red ball next to the green box " * 70  # > 512 tokens
# video_id, uri, queries, expected {query_index: "ok" | error fragment}; a uri is relative (under
# videos/) without a scheme, {http} is a local HTTP server on videos/ (https:// to it fails its TLS)
MIXED = [
    ("good", "walk.mp4", ["a red ball", LONG_QUERY, "a person riding a 🚲"],
     {0: "ok", 1: "query 1: query has", 2: "ok"}),
    ("gs", "gs://bucket/v.mp4", ["a"], {0: "unsupported URI scheme 'gs'"}),
    ("hdfs", "hdfs://namenode/v.mp4", ["a", "b"], {0: "unsupported URI scheme", 1: "unsupported"}),
    ("http", "http://{http}/walk.mp4", ["a red ball"], {0: "ok"}),
    ("https", "https://{http}/walk.mp4", ["a", "b"],
     {0: "cannot read video https://{http}/walk.mp4: ClientConnectorSSLError", 1: "SSL"}),
    ("http-404", "http://{http}/gone.mp4", ["a"], {0: "object not found: http://{http}/gone.mp4"}),
    ("file-relative", "file://videos/walk.mp4", ["the green box"], {0: "ok"}),  # next to manifest
    ("empty", "empty.mp4", ["a"], {0: "empty file (0 bytes)"}),
    ("text", "notes.mp4", ["a"], {0: "not a video container (the file starts with text"}),
    ("truncated", "cut.mp4", ["a", "b"], {0: "truncated: moov atom missing", 1: "moov atom missing"}),
    ("fast-start-cut", "fastcut.mp4", ["a"], {0: "truncated: the file ends inside the 'mdat' box"}),
    ("only-long", "walk.mp4", [LONG_QUERY], {0: "no query can run (query 0: query has"}),
]  # fmt: skip


@pytest.fixture()
def http_videos(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """``host:port`` of a plain HTTP server on a folder (the Ray workers reach it on loopback)."""
    import functools
    import http.server
    import threading

    root = tmp_path / "in" / "videos"
    root.mkdir(parents=True)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(root))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}", root
    server.shutdown()


def test_every_bad_kind_with_good_clips_exits_3(
    ray_session, tmp_path: Path, rvos_dir, videos, http_videos, capsys
) -> None:
    """Unsupported schemes, http(s) videos (one served, one whose TLS fails, one missing), a
    relative file:// uri, an over-long query next to good ones, empty/text/truncated files and an
    emoji query (rendered) next to good clips: one row per (video, query[, frame]), the good
    queries' masks those of predict_video, errors that say why, and exit 3 (published, more error
    rows than --max-error-rate), none of them counted as infrastructure."""
    from vbatch.jobs.cli import main

    host, videos_dir = http_videos
    root = videos_dir.parent
    walk = videos["walk.mp4"]
    (videos_dir / "walk.mp4").write_bytes(walk)
    (videos_dir / "empty.mp4").write_bytes(b"")
    (videos_dir / "notes.mp4").write_text("a shopping list, not a video\n" * 20)
    (videos_dir / "cut.mp4").write_bytes(walk[: walk.index(b"mdat") + 200])  # no index yet
    # the index first, the file cut in the middle of its frames
    (videos_dir / "fastcut.mp4").write_bytes(fast_start(walk)[: -boxes(walk)["mdat"][1] // 2])
    mixed = [
        (vid, uri.format(http=host), queries, {q: e.format(http=host) for q, e in expect.items()})
        for vid, uri, queries, expect in MIXED
    ]
    pq.write_table(
        pa.table(
            {
                "video_id": [m[0] for m in mixed],
                "uri": [m[1] if "://" in m[1] else f"videos/{m[1]}" for m in mixed],
                "queries": pa.array([m[2] for m in mixed], pa.list_(pa.string())),
            }
        ),
        root / "manifest.parquet",
    )
    out = tmp_path / "out"
    args = ["video", "--manifest", str(root / "manifest.parquet"), "--model-dir", str(rvos_dir)]
    summary_json = tmp_path / "summary.json"
    # published with more error rows than --max-error-rate allows: exit 3 (jobs.summary)
    assert main([*args, "--out", str(out), "--render", "--summary-json", str(summary_json)]) == 3
    report = capsys.readouterr().out
    assert report.startswith(f"rvos: {len(mixed)} videos — 2 ok, {len(mixed) - 2} with errors"), (
        report
    )
    assert "renders: 3 under" in report  # good, http and file-relative
    record = json.loads(summary_json.read_text())
    assert (record["exit_code"], record["status"]) == (3, "too_many_errors")
    assert "infrastructure" not in record["by_error_class"], record["by_error_class"]
    assert record["by_status"]["ok"] == 4 * 25  # good (2 queries), http, file-relative

    table = read_table(str(out / "results"), Storage())
    validate_video_results(table)
    rows = table.to_pylist()
    assert sorted({r["manifest_row"] for r in rows}) == list(range(len(mixed)))
    predictor = load_model("rvos", rvos_dir, device="cpu")
    for m, (vid, _uri, queries, expect) in enumerate(mixed):
        got = [r for r in rows if r["manifest_row"] == m]
        assert {r["query_index"] for r in got} == set(expect) and {r["video_id"] for r in got} == {
            vid
        }
        ok = [qi for qi, e in expect.items() if e == "ok"]
        for qi, status in expect.items():
            q_rows = [r for r in got if r["query_index"] == qi]
            if status == "ok":
                assert [
                    r["frame_index"] for r in sorted(q_rows, key=lambda r: r["frame_index"])
                ] == (list(range(25)))
                assert all(r["status"] == "ok" for r in q_rows)
                continue
            assert len(q_rows) == 1 and q_rows[0]["status"] == "error", q_rows
            assert status in q_rows[0]["error"], q_rows[0]["error"]
        if ok:  # the good queries ran, unharmed by the long one: predict_video's masks
            frames = decode_all(str(videos_dir / "walk.mp4"))  # every good row is this clip
            want = predictor.predict_video(frames, [queries[qi] for qi in ok])
            for j, qi in enumerate(ok):
                for r in (r for r in got if r["query_index"] == qi):
                    png = cv2.imread(r["mask_uri"], cv2.IMREAD_UNCHANGED)
                    assert np.array_equal(png, want[j, r["frame_index"]]), (vid, qi)
    long_error = next(r["error"] for r in rows if r["video_id"] == "good" and r["query_index"] == 1)
    assert "the text encoder takes at most 512" in long_error
    render = decord.VideoReader(
        str(out / "renders" / "good.mp4")
    )  # the emoji query did not crash it
    assert len(render) == 25


def test_ground_truth_gives_j_and_f_per_frame(
    ray_session, tmp_path: Path, rvos_dir, videos, expected_masks
) -> None:
    """``gt_mask_dir``: J and F for each frame that has a ground truth, ``gt_error`` for a query
    whose ground truth is unusable (rows stay ok), and the report's J&F table."""
    from vbatch.jobs.report import build_report
    from vbatch.operators.quality import boundary_f

    root = tmp_path / "in"
    (root / "videos").mkdir(parents=True)
    (root / "videos" / "walk.mp4").write_bytes(videos["walk.mp4"])
    (root / "videos" / "ride.mp4").write_bytes(videos["ride.mp4"])
    # walk, query 0: the exact masks (J = F = 1 on every frame); query 1: a hand-made box on every
    # fifth frame (Ref-YouTube-VOS annotates every fifth), frame 10's file corrupt
    gt = root / "gt" / "walk"
    lo, exact = expected_masks["walk", 0]
    (gt / "0").mkdir(parents=True)
    for k, mask in enumerate(exact):
        cv2.imwrite(str(gt / "0" / f"{lo + k}.png"), mask)
    box = np.zeros((SIZE[1], SIZE[0]), np.uint8)
    box[4:20, 3:25] = 255
    (gt / "1").mkdir()
    for f in range(0, 25, 5):
        cv2.imwrite(str(gt / "1" / f"{f}.png"), box)
    (gt / "1" / "10.png").write_bytes(b"not a png")
    pq.write_table(
        pa.table(
            {
                "video_id": ["walk", "ride/clip"],
                "uri": ["videos/walk.mp4", "videos/ride.mp4"],
                "queries": pa.array([CASES[0][2], CASES[2][2]], pa.list_(pa.string())),
                "start_s": [None, 0.5],
                "end_s": [None, 1.25],
                "gt_mask_dir": ["gt/walk", "gt/nowhere"],
            }
        ),
        root / "manifest.parquet",
    )
    out = tmp_path / "out"
    summary = run_video(VideoConfig(str(root / "manifest.parquet"), str(rvos_dir), str(out)))
    assert summary.videos_ok == 2
    rows = read_table(str(out / "results"), Storage()).to_pylist()
    assert all(r["status"] == "ok" for r in rows)
    walk0 = {r["frame_index"]: r for r in rows if r["video_id"] == "walk" and r["query_index"] == 0}
    assert sorted(walk0) == list(range(25))
    assert all(
        r["gt_j"] == 1.0 and r["gt_f"] == 1.0 and r["gt_error"] is None for r in walk0.values()
    )
    walk1 = {r["frame_index"]: r for r in rows if r["video_id"] == "walk" and r["query_index"] == 1}
    _, masks1 = expected_masks["walk", 1]
    g = box > 128
    for f, r in walk1.items():
        if f % 5 or f == 10:  # not annotated, or its file is unreadable: not scored
            assert r["gt_j"] is None and r["gt_f"] is None, f
            continue
        p = masks1[f] > 128
        union = np.count_nonzero(p | g)
        assert r["gt_j"] == pytest.approx(np.count_nonzero(p & g) / union if union else 1.0)
        assert r["gt_f"] == pytest.approx(boundary_f(p, g))
    assert "gt/walk/1/10.png" in walk1[10]["gt_error"]
    assert all(r["gt_error"] is None for f, r in walk1.items() if f != 10)
    clip = [r for r in rows if r["video_id"] == "ride/clip"]
    assert clip and all(r["gt_j"] is None for r in clip)
    assert all("no ground-truth masks" in r["gt_error"] for r in clip)

    build_report(str(out), Storage())
    html = (out / "report" / "index.html").read_text()
    assert "Videos against the ground truth: J&amp;F" in html
    assert ">walk</td>" in html and "region J (IoU), per frame" in html
