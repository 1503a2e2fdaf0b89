"""The re-ID pages of the report: the gallery index's page after ``reid index`` and the query strips
of a ``reid search --out`` run, with hits framed by person."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.index_data import clustered
from vbatch.jobs.report import build_report
from vbatch.jobs.report.reid import OTHER, SAME, UNKNOWN
from vbatch.operators.index import build_index
from vbatch.operators.storage import Storage

PEOPLE, PER_PERSON, DIM = 6, 6, 16


def _table(folder: Path, prefix: str, x: np.ndarray, people: list[int | None]) -> None:
    """An embeddings table like ``reid embed`` writes, with relative crop URIs (a run.json names
    the manifest, whose folder they resolve against) and each crop painted in its person's hue."""
    (folder / "crops").mkdir(parents=True, exist_ok=True)
    ids = [f"{prefix}-{i:03d}" for i in range(len(x))]
    for image_id, person in zip(ids, people, strict=True):
        crop = np.zeros((64, 32, 3), np.uint8)
        crop[:] = (40 * (person or 0) % 255, 120, 200)
        cv2.imwrite(str(folder / "crops" / f"{image_id}.png"), crop)
    (folder / "out").mkdir()
    pq.write_table(
        pa.table(
            {
                "image_id": ids,
                "uri": [f"crops/{i}.png" for i in ids],
                "status": ["ok"] * len(ids),
                "embedding": pa.array([v.tolist() for v in x], pa.list_(pa.float32(), DIM)),
                "model_version": ["reid-v1"] * len(ids),
                "person_id": pa.array(people, pa.int64()),
            }
        ),
        folder / "out" / "part-0.parquet",
    )
    (folder / "out" / "run.json").write_text(
        '{"manifest_files": ["%s"]}' % (folder / "manifest.parquet")
    )


def _gallery(tmp_path: Path) -> str:
    x, ident = clustered(PEOPLE, PER_PERSON, DIM, seed=3, noise=0.3)
    _table(tmp_path / "gallery", "g", x, ident.tolist())
    index = str(tmp_path / "index")
    build_index(str(tmp_path / "gallery" / "out"), index, Storage())
    return index


def _frame_colour(path: Path) -> tuple[int, ...]:
    bgr = cv2.imread(str(path))
    return tuple(int(c) for c in bgr[1, 1][::-1])


def _close(a: tuple[int, ...], b: tuple[int, int, int]) -> bool:
    return max(abs(p - q) for p, q in zip(a, b, strict=True)) < 40  # JPEG


def test_index_page_shows_facts_and_same_person_neighbours(tmp_path: Path) -> None:
    index = _gallery(tmp_path)
    info = build_report(index, Storage(), samples=4)
    html = Path(info.index_uri).read_text()
    assert "Gallery index" in html and f"<td>vectors</td><td>{PEOPLE * PER_PERSON}</td>" in html
    assert html.count('<div class="card">') == 4
    # 6 images per person, itself left out: its 5 hits are its 5 other images
    assert html.count("5 of 5 shown hits the same person") == 4
    assert "crop not found" not in html
    pictures = sorted((Path(index) / "report" / "reid").glob("*.jpg"))
    assert len(pictures) == 4 * 6
    hits = [p for p in pictures if not p.name.endswith("-00.jpg")]
    assert all(_close(_frame_colour(p), SAME) for p in hits)


def test_search_report_frames_hits_by_person(ray_session, tmp_path: Path) -> None:
    from vbatch.jobs.reid_search import SearchJobConfig, run_search_job

    index = _gallery(tmp_path)
    fresh, ident = clustered(PEOPLE, 1, DIM, seed=3, noise=0.3, draw_seed=9)
    people: list[int | None] = ident.tolist()
    people[1], people[2] = 99, None  # a person the gallery does not have; an unknown one
    _table(tmp_path / "queries", "q", fresh, people)
    out = tmp_path / "search"
    run_search_job(
        SearchJobConfig(
            index=index, out=str(out), embeddings=str(tmp_path / "queries" / "out"), k=5
        )
    )
    build_report(str(out), Storage(), samples=48)
    html = (out / "report" / "index.html").read_text()
    assert "Queries and their top 5 hits" in html and "Gallery index" in html
    assert html.count('<div class="card">') == PEOPLE
    assert "crop not found" not in html
    assert html.count("5 of 5 shown hits the same person") == PEOPLE - 2
    assert "person 99: 0 of 5" in html
    cards = re.findall(r'<div class="card">(.*?)</div></div>', html)
    colours = {}
    for card in cards:
        query = re.search(r"<b>(q-\d+)</b>", card).group(1)  # type: ignore[union-attr]
        srcs = re.findall(r'src="([^"]+)"', card)
        colours[query] = [_frame_colour(out / "report" / s) for s in srcs[1:]]
    assert all(_close(c, OTHER) for c in colours["q-001"])
    assert all(_close(c, UNKNOWN) for c in colours["q-002"])
    assert all(_close(c, SAME) for c in colours["q-000"])


@pytest.mark.browser
def test_index_page_renders_in_a_browser(tmp_path: Path) -> None:
    from tests.services import missing_service
    from tests.test_report_browser import CHROMIUM, _console_errors, _run

    if CHROMIUM is None:
        missing_service("no chromium on PATH (.ci/run installs it in CI)")
    info = build_report(_gallery(tmp_path), Storage(), samples=3)
    result = _run(Path(info.index_uri), tmp_path / "profile", "--dump-dom")
    assert result.returncode == 0, result.stderr[-2000:]
    marker = re.search(r'<body[^>]*data-images="(\d+)/(\d+) loaded"', result.stdout)
    assert marker and marker.group(1) == marker.group(2) == str(3 * 6)
    assert _console_errors(result.stderr) == []
