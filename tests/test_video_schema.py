"""Video manifest and results schemas: fail-fast column checks, per-row and per-query problems."""

from __future__ import annotations

import pyarrow as pa
import pytest

from vbatch.schemas.videos import (
    VIDEO_RESULTS,
    ManifestError,
    check_video_manifest_schema,
    query_errors,
    validate_video_results,
    video_row_errors,
)

GOOD = pa.schema(
    [("video_id", pa.string()), ("uri", pa.string()), ("queries", pa.list_(pa.string()))]
)


def test_good_schemas_pass() -> None:
    check_video_manifest_schema(GOOD, "m.parquet")
    check_video_manifest_schema(
        pa.schema(
            [
                ("video_id", pa.large_string()),
                ("uri", pa.string()),
                ("queries", pa.large_list(pa.large_string())),
                ("start_s", pa.float32()),
                ("end_s", pa.int64()),
                ("anything", pa.binary()),
            ]
        ),
        "m.parquet",
    )


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        (GOOD.remove(2), r"m\.parquet: missing required column 'queries' \(found: video_id, uri\)"),
        (GOOD.remove(0), r"m\.parquet: missing required column 'video_id'"),
        (GOOD.set(1, pa.field("uri", pa.int32())), r"column 'uri' must be string, found int32"),
        (
            GOOD.set(2, pa.field("queries", pa.string())),
            r"column 'queries' must be list<string>, found string",
        ),
        (
            GOOD.set(2, pa.field("queries", pa.list_(pa.int64()))),
            r"column 'queries' must be list<string>",
        ),
        (GOOD.append(pa.field("start_s", pa.string())), r"column 'start_s' must be a number"),
        (GOOD.append(pa.field("_vb_row", pa.int64())), r"_vb_row use the reserved prefix"),
    ],
)
def test_bad_schemas_name_file_and_column(schema: pa.Schema, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        check_video_manifest_schema(schema, "m.parquet")


def test_row_errors() -> None:
    rows = [
        ("a", "a.mp4", ["q"], None, None, None),
        (None, "b.mp4", ["q"], None, None, "manifest row 1: video_id is null"),
        (" ", "b.mp4", ["q"], None, None, "manifest row 2: video_id is empty"),
        ("a", "c.mp4", ["q"], None, None, "duplicate video_id 'a' (first at row 0"),
        ("d", " ", ["q"], None, None, "manifest row 4: uri is empty"),
        ("e", "e.mp4", [], None, None, "manifest row 5: queries is empty"),
        ("f", "f.mp4", None, None, None, "manifest row 6: queries is empty"),
        ("g", "g.mp4", ["", None], None, None, "manifest row 7: every query is empty"),
        ("h", "h.mp4", ["q", ""], 1.0, 2.5, None),  # one good query is enough
        ("i", "i.mp4", ["q"], 3.0, 3.0, "manifest row 9: start_s (3.0) must be before end_s (3.0)"),
        ("j", "j.mp4", ["q"], -1.0, None, "start_s must be >= 0"),
        ("k", "k.mp4", ["q"], None, float("nan"), "must be finite"),
        ("l", "l.mp4", ["q"], 5.0, None, None),
    ]
    errors = video_row_errors(*(list(col) for col in list(zip(*rows, strict=True))[:5]))
    assert len(errors) == len(rows)
    for (vid, *_rest, expected), got in zip(rows, errors, strict=True):
        if expected is None:
            assert got is None, (vid, got)
        else:
            assert got is not None and expected in got, (vid, got)


def test_query_errors() -> None:
    assert query_errors(["a dog", "", None, "  x "]) == [
        None,
        "query is empty",
        "query is null",
        None,
    ]
    assert query_errors(None) == [] and query_errors([]) == []


def test_validate_results() -> None:
    ok = {
        "video_id": "v",
        "uri": "/v.mp4",
        "query_index": 0,
        "query": "q",
        "frame_index": 3,
        "timestamp_s": 0.125,
        "mask_uri": "/out/frames/v/0/3.png",
        "status": "ok",
        "error": None,
        "model_version": "abc",
        "manifest_row": 0,
    }
    validate_video_results(pa.Table.from_pylist([ok], schema=VIDEO_RESULTS))
    for bad, message in [
        ({"status": "error"}, "status 'error' with error None"),
        ({"status": "done"}, "neither 'ok' nor 'error'"),
        ({"mask_uri": None}, "ok without a mask_uri"),
    ]:
        with pytest.raises(ValueError, match=message):
            validate_video_results(pa.Table.from_pylist([{**ok, **bad}], schema=VIDEO_RESULTS))
    with pytest.raises(ValueError, match="missing column 'manifest_row'"):
        validate_video_results(
            pa.Table.from_pylist([ok], schema=VIDEO_RESULTS).drop_columns(["manifest_row"])
        )


def test_any_uri_scheme_is_left_to_the_job() -> None:
    """The schema takes an uri as a string: an unsupported scheme is the video's error row later
    (``vbatch video`` resolves it per row), never a crash of the manifest check."""
    uris = ["https://cdn.example.com/a.mp4", "gs://b/a.mp4", "s3://b/a.mp4", "a.mp4", "ftp://h/x"]
    assert video_row_errors([f"v{i}" for i in range(5)], uris, [["q"]] * 5) == [None] * 5
