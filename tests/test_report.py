"""The run report on hand-made finished runs (no Ray): contents, determinism, relative links,
missing pieces, --compare, S3, the CLI; and one real `segment` run with ground truth that writes
its metrics and its report."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.report_data import ellipse_mask, make_run, write_table
from vbatch.jobs.cli import main
from vbatch.jobs.cli.command import write_report
from vbatch.jobs.publish import read_table
from vbatch.jobs.report import build_report
from vbatch.jobs.report.data import (
    Light,
    extreme_positions,
    load_run,
    read_rows,
    sample_positions,
)
from vbatch.operators.storage import Storage, join


def _srcs(html: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', html)


def _sample_ids(html: str) -> list[str]:
    sheet = html.split("<h2>Contact sheet</h2>", 1)[1].split("<h2>", 1)[0]
    return re.findall(r'<div class="meta"><b>([^<]+)</b>', sheet)


def test_report_of_a_salient_run_with_ground_truth(tmp_path: Path) -> None:
    storage = Storage()
    out, _ = make_run(storage, str(tmp_path), "salient", n=12, gt=True)
    info = build_report(out, storage, samples=5)
    assert info.index_uri == join(out, "report", "index.html") and info.rows == 14
    html = Path(info.index_uri).read_text()
    for title in ("The run at a glance", "Errors by class", "Quality against the ground truth",
                  "Contact sheet", "Worth a look", "Distributions", "Configuration"):  # fmt: skip
        assert f"<h2>{title}" in html, title
    # at a glance: counts, exit status and throughput from run.json
    assert "<td>rows</td><td>14</td>" in html and "<td>error</td><td>2</td>" in html
    assert "throughput (images/s)</td><td>12.5</td>" in html
    # errors grouped by class with their examples
    assert "<td>decode</td>" in html and "broken</code>: cannot decode" in html
    assert "<td>not_found</td>" in html and "gone</code>: object not found" in html
    # metrics over the 11 rows whose ground truth was readable (img-000's is missing)
    assert re.search(r"<td>S-measure</td><td class=\"n\">11</td>", html)
    assert "ground truth: object not found" in html
    # the sample: 5 ok rows; the error rows appear in their own list with the readable input
    assert len(_sample_ids(html)) == 5 and not {"broken", "gone"} & set(_sample_ids(html))
    assert "Emptiest masks" in html and "Fullest masks" in html and "Largest images" in html
    assert "Worst S-measure" in html
    # heat-map overlays for saliency, every picture a relative path that exists
    assert "saliency heat-map" in html
    srcs = _srcs(html)
    assert srcs and all(not s.startswith(("/", "http", "file:")) for s in srcs)
    for s in srcs:
        assert (Path(out) / "report" / s).stat().st_size > 0, s
    plots = {p.name for p in (Path(out) / "report" / "plots").iterdir()}
    assert {"foreground_ratio.png", "mask_area.png", "image_sizes.png", "gt_smeasure.png"} <= plots
    # no external resources of any kind
    assert not re.search(r"(src|href)=\"(https?:)?//", html)


def test_emptiest_and_fullest_are_the_extremes(tmp_path: Path) -> None:
    storage = Storage()
    out, _ = make_run(storage, str(tmp_path), "salient", n=10)
    html = Path(build_report(out, storage, samples=0, extremes=2).index_uri).read_text()
    emptiest = html.split("Emptiest masks", 1)[1].split("<h3>", 1)[0]
    fullest = html.split("Fullest masks", 1)[1].split("<h3>", 1)[0]
    # mask i covers an ellipse of scale i / n: img-000 is empty, img-009 the fullest
    assert re.findall(r"<b>(img-\d+)</b>", emptiest) == ["img-000", "img-001"]
    assert re.findall(r"<b>(img-\d+)</b>", fullest) == ["img-009", "img-008"]
    assert '<h2>Contact sheet</h2><p class="muted">0 of 10' in html


def test_sample_is_deterministic_whatever_the_layout(tmp_path: Path) -> None:
    storage = Storage()
    out, _ = make_run(storage, str(tmp_path), "salient", n=12)
    first = _sample_ids(Path(build_report(out, storage, samples=4).index_uri).read_text())
    again = _sample_ids(Path(build_report(out, storage, samples=4).index_uri).read_text())
    assert first == again and len(first) == 4
    # the same rows shuffled over three files: the same sample
    table = read_table(out, storage)
    perm = np.random.default_rng(1).permutation(table.num_rows)
    write_table(storage, out, table.take(pa.array(perm)), files=3)
    shuffled = _sample_ids(Path(build_report(out, storage, samples=4).index_uri).read_text())
    assert shuffled == first


def test_sample_and_extreme_positions() -> None:
    light = Light(
        rows=5,
        key=np.array([50, 10, 40, 20, 30], np.uint64),
        ok=np.array([True, True, False, True, True]),
        numeric={"foreground_ratio": np.array([0.5, np.nan, 0.0, 0.9, 0.1], np.float32)},
    )
    assert sample_positions(light, 2) == [1, 3]  # smallest keys among ok rows (2 is an error)
    assert sample_positions(light, 10) == [1, 3, 4, 0]
    assert sample_positions(light, 0) == []
    assert extreme_positions(light, "foreground_ratio", 2, largest=False) == [4, 0]
    assert extreme_positions(light, "foreground_ratio", 2, largest=True) == [3, 0]
    assert extreme_positions(light, "gt_iou", 2, largest=True) == []


def test_matting_and_shop_seg_panels(tmp_path: Path) -> None:
    storage = Storage()
    out, _ = make_run(storage, str(tmp_path), "matting", n=4, out_name="mat")
    html = Path(build_report(out, storage).index_uri).read_text()
    assert "cut-out" in html and "matte" in html
    out, _ = make_run(storage, str(tmp_path), "shop-seg", n=4, gt=True, out_name="shop")
    html = Path(build_report(out, storage).index_uri).read_text()
    assert "mask outline" in html and "Worst IoU" in html


def test_missing_pieces_are_notes_not_failures(tmp_path: Path) -> None:
    storage = Storage()
    out, rows = make_run(storage, str(tmp_path), "salient", n=6)
    (Path(out) / "run.json").unlink()
    Path(rows[3]["mask_uri"]).unlink()  # a product deleted since
    (tmp_path / "imgs" / "img-004.jpg").unlink()  # an input deleted since
    html = Path(build_report(out, storage, samples=6).index_uri).read_text()
    assert "missing: counts are the table" in html
    assert "mask_uri unreadable: FileNotFoundError" in html
    assert "input unreadable" in html
    with pytest.raises(FileNotFoundError, match="no results table"):
        build_report(str(tmp_path / "nothing"), storage)


def test_rebuild_replaces_the_folder(tmp_path: Path) -> None:
    storage = Storage()
    out, _ = make_run(storage, str(tmp_path), "salient", n=6)
    build_report(out, storage, samples=6)
    before = len(list((Path(out) / "report" / "thumbs").iterdir()))
    build_report(out, storage, samples=1, extremes=1)
    assert len(list((Path(out) / "report" / "thumbs").iterdir())) < before


def test_compare_two_runs(tmp_path: Path) -> None:
    storage = Storage()
    out, _ = make_run(storage, str(tmp_path), "salient", n=8, gt=True)
    # the other run's masks are larger than the ground truth: worse on every metric
    other, _ = make_run(
        storage, str(tmp_path), "salient", n=8, gt=True, scale_shift=0.3, out_name="b"
    )
    html = Path(build_report(out, storage, compare=other).index_uri).read_text()
    section = html.split("<h2>Compared with", 1)[1].split("<h2>", 1)[0]
    mae = re.search(r"<td>MAE \(lower is better\)</td>(.*?)</tr>", section).group(1)
    assert "better" in mae and "-" in re.findall(r'<td class="n">([^<]*)</td>', mae)[3]
    assert "Images whose outputs changed most" in section
    changed = re.findall(r"<b>(img-\d+)</b> · mean \|difference\| ([\d.]+)", section)
    diffs = [float(d) for _, d in changed]
    assert len(changed) == 8 and diffs == sorted(diffs, reverse=True) and diffs[0] > 0
    for s in _srcs(section):
        assert (Path(out) / "report" / s).exists()


def test_read_rows_reads_only_the_groups_shown(tmp_path: Path) -> None:
    storage = Storage()
    out, _ = make_run(storage, str(tmp_path), "salient", n=12)
    run = load_run(out, storage)
    rows, read = read_rows(run.files, storage, run.light, [0])
    assert list(rows) == [0] and rows[0]["image_id"] == "img-000"
    everything = sum(
        pq.ParquetFile(f).metadata.row_group(g).total_byte_size
        for f in run.files
        for g in range(pq.ParquetFile(f).num_row_groups)
    )
    assert 0 < read < everything


def test_report_on_s3(s3_server, tmp_path: Path) -> None:
    storage = s3_server.storage()
    root = s3_server.new_bucket()
    out, _ = make_run(storage, root, "salient", n=5, gt=True)
    assert main(["report", "--out", out, "--s3-endpoint", s3_server.endpoint]) == 0
    html = storage.read_bytes(join(out, "report", "index.html")).decode()
    srcs = _srcs(html)
    assert srcs
    for s in srcs:
        assert storage.read_bytes(join(out, "report", s)), s
    # served from the bucket, a browser renders the page and shows the pictures
    fs, path = storage.fs(join(out, "report", "index.html"))
    assert fs.info(path)["ContentType"].startswith("text/html")
    fs, path = storage.fs(join(out, "report", srcs[0]))
    assert fs.info(path)["ContentType"] == "image/jpeg"


def test_a_failing_report_never_fails_the_job(tmp_path: Path, caplog) -> None:
    import argparse

    args = argparse.Namespace(report_samples=48, s3_endpoint=None)
    record = {"out": str(tmp_path / "no-such-run"), "exit_code": 0}
    write_report(record["out"], args, record)
    assert "report could not be written" in caplog.text
    args.report_samples = 0  # off: not even tried
    write_report(str(tmp_path / "no-such-run"), args, {})
    assert not (tmp_path / "no-such-run").exists()


def test_segment_with_ground_truth_writes_metrics_and_report(ray_session, tmp_path: Path) -> None:
    """A real `segment` run: metrics in the results table, an unreadable ground truth as a note
    on an ok row, and <out>/report/index.html."""
    from vbatch.jobs.demo_data import encode, product_image
    from vbatch.models.salient.modeldir import write_random_model_dir

    model = write_random_model_dir(tmp_path / "model", norm_size=(64, 64))
    root = tmp_path / "in"
    (root / "imgs").mkdir(parents=True)
    (root / "gt").mkdir()
    rows = []
    for i in range(4):
        (root / "imgs" / f"{i}.jpg").write_bytes(encode(product_image(i, (60, 40))))
        gt = f"gt/{i}.png"
        if i == 1:
            (root / gt).write_bytes(b"not a png")
        elif i != 2:  # 2: missing
            (root / gt).write_bytes(cv2.imencode(".png", ellipse_mask(40, 60, 0.5))[1].tobytes())
        rows.append(
            {"image_id": f"im{i}", "uri": f"imgs/{i}.jpg", "gt_mask_uri": gt if i != 3 else None}
        )
    rows.append({"image_id": "bad", "uri": "imgs/none.jpg", "gt_mask_uri": "gt/0.png"})
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    (root / "manifest.parquet").write_bytes(buf.getvalue())
    out = tmp_path / "out"
    argv = ["segment", "--task", "salient", "--manifest", str(root / "manifest.parquet")]
    argv += ["--model-dir", str(model), "--out", str(out), "--max-error-rate", "0.5"]
    assert main(argv) == 0
    table = read_table(str(out), Storage()).to_pylist()
    by_id = {r["image_id"]: r for r in table}
    assert by_id["im0"]["status"] == "ok" and by_id["im0"]["gt_error"] is None
    assert 0 <= by_id["im0"]["gt_mae"] <= 1 and 0 <= by_id["im0"]["gt_smeasure"] <= 1
    assert 0 <= by_id["im0"]["foreground_ratio"] <= 1
    assert by_id["im1"]["status"] == "ok" and by_id["im1"]["gt_mae"] is None
    assert "not a decodable image" in by_id["im1"]["gt_error"]
    assert by_id["im2"]["status"] == "ok" and "object not found" in by_id["im2"]["gt_error"]
    assert by_id["im3"]["gt_mae"] is None and by_id["im3"]["gt_error"] is None  # no ground truth
    assert by_id["bad"]["status"] == "error" and by_id["bad"]["gt_mae"] is None
    # the metrics agree with scoring the written mask again
    from vbatch.operators.quality import salient_metrics

    mask = cv2.imread(by_id["im0"]["mask_uri"], cv2.IMREAD_GRAYSCALE)
    again = salient_metrics(mask, ellipse_mask(40, 60, 0.5))
    assert by_id["im0"]["gt_smeasure"] == pytest.approx(again["gt_smeasure"], rel=1e-6)
    html = (out / "report" / "index.html").read_text()
    assert "Quality against the ground truth" in html and "<td>rows</td><td>5</td>" in html
    assert json.loads((out / "run.json").read_text())["exit_code"] == 0


def test_video_run_shows_strips_per_query(tmp_path: Path) -> None:
    from vbatch.jobs.demo_data import write_demo_clip
    from vbatch.operators.video.write import mask_uri
    from vbatch.schemas.videos import VIDEO_RESULTS

    storage = Storage()
    clip = write_demo_clip(tmp_path / "clip.mp4", seconds=1.0)  # 24 frames, 160×120
    out = str(tmp_path / "rvos")
    queries = ["a red ball rolling", "the green box"]
    rows = []
    for qi, query in enumerate(queries):
        for f in range(24):
            mask = np.zeros((120, 160), np.uint8)
            mask[40:80, f * 5 : f * 5 + 30] = 255
            uri = mask_uri(out, "clip", qi, f)
            storage.write_bytes(uri, cv2.imencode(".png", mask)[1].tobytes())
            rows.append({"video_id": "clip", "uri": str(clip), "query_index": qi, "query": query,
                         "frame_index": f, "timestamp_s": f / 24, "mask_uri": uri, "status": "ok",
                         "model_version": "v1", "manifest_row": 0})  # fmt: skip
    rows.append({"video_id": "bad", "uri": "nope.mp4", "status": "error", "manifest_row": 1,
                 "error": "object not found: nope.mp4"})  # fmt: skip
    table = pa.Table.from_pylist(rows, schema=VIDEO_RESULTS)
    write_table(storage, out, table)
    (tmp_path / "rvos" / "renders").mkdir()
    (tmp_path / "rvos" / "renders" / "clip.mp4").write_bytes(b"mp4")
    html = Path(build_report(out, storage, samples=10).index_uri).read_text()
    section = html.split("<h2>Videos: masks per query</h2>", 1)[1].split("<h2>", 1)[0]
    # both queries of the clip, each a strip of 6 frames spread over its 24, with the render link
    assert "“a red ball rolling”" in section and "“the green box”" in section
    assert section.count("<figcaption>frame 0</figcaption>") == 2
    assert section.count("<figcaption>frame 23</figcaption>") == 2
    assert len(_srcs(section)) == 12 and 'href="../renders/clip.mp4"' in section
    for s in _srcs(section):
        assert (Path(out) / "report" / s).exists()
    assert "<td>not_found</td>" in html or "<td>unclassified</td>" in html


def test_embedding_run_shows_inputs(tmp_path: Path) -> None:
    """A `reid embed` table (no products): the generic page with the input crops."""
    from vbatch.jobs.demo_data import encode, person_crop
    from vbatch.schemas.images import image_results_schema

    storage = Storage()
    out = str(tmp_path / "emb")
    rows = []
    for i in range(4):
        storage.write_bytes(join(str(tmp_path), f"crops/{i}.jpg"), encode(person_crop(i, i)))
        rows.append({"image_id": f"p{i}", "uri": f"crops/{i}.jpg", "task": "reid", "status": "ok",
                     "width": 64, "height": 128, "embedding": [0.0] * 7 + [1.0]})  # fmt: skip
    table = pa.Table.from_pylist(rows, schema=image_results_schema("embedding", embedding_dim=8))
    write_table(storage, out, table)
    storage.write_bytes(
        join(out, "run.json"),
        json.dumps(
            {"command": "reid embed", "manifest_files": [join(str(tmp_path), "m.parquet")]}
        ).encode(),
    )
    html = Path(build_report(out, storage).index_uri).read_text()
    assert "reid embed" in html and html.count("<figcaption>input</figcaption>") >= 4
