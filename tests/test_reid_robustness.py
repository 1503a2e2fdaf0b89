"""`vbatch reid` refuses or flags every invalid vector, length, version and damaged index, naming
the row or the file (issue 17, items 2 and 4-9). Small dims, local files; Ray only for the
batch search job."""

from __future__ import annotations

import io
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.index_data import clustered, write_embeddings
from tests.test_reid_jobs import _gallery, _queries
from vbatch.jobs.cli import main
from vbatch.jobs.demo_data import encode, person_crop
from vbatch.jobs.publish import read_table
from vbatch.operators import index as fi
from vbatch.operators.index.embeddings import vector_problems
from vbatch.operators.storage import Storage


def _floats(v) -> list[float]:
    return [float(a) for a in v]


def _eval_table(path: Path, rows: list, model_version: str = "v1", first: int = 0) -> None:
    n = len(rows)
    pq.write_table(
        pa.table(
            {
                "image_id": [f"e{first + i}" for i in range(n)],
                "status": ["ok"] * n,
                "embedding": pa.array(rows, pa.list_(pa.float32())),
                "person_id": [(first + i) % 5 + 1 for i in range(n)],
                "camera_id": [(first + i) % 2 for i in range(n)],
                "model_version": [model_version] * n,
            }
        ),
        path,
    )


# -- item 2: every row's length is checked, and the odd row is the one named ----------------------
def test_index_names_a_short_first_row_not_the_good_rows_after_it(tmp_path: Path, capsys) -> None:
    # rows 0 and 1 of 15 and 17 values add up to 2 x 16; the dimension used to be taken from
    # row 0, which then passed and every good row was reported as the odd one
    x, _ = clustered(10, 3, 16, seed=5)
    rows = [_floats(v) for v in x]
    rows[1] = [rows[0][-1], *rows[1]]
    rows[0] = rows[0][:-1]
    emb = tmp_path / "emb.parquet"
    pq.write_table(
        pa.table(
            {
                "image_id": [f"g{i}" for i in range(len(rows))],
                "status": ["ok"] * len(rows),
                "embedding": pa.array(rows, pa.list_(pa.float32())),
                "model_version": ["reid-v1"] * len(rows),
            }
        ),
        emb,
    )
    assert main(["reid", "index", "--embeddings", str(emb), "--out", str(tmp_path / "i")]) == 1
    err = capsys.readouterr().err
    assert f"{emb}: row 0 (image_id=g0) has status 'ok' but embedding has 15 values, " in err
    assert "expected 16 (and 1 more rows of this batch)" in err
    assert not (tmp_path / "i" / "index.json").exists()


def test_search_embeddings_checks_each_query_against_the_gallery_dim(
    tmp_path: Path, capsys
) -> None:
    # the first query is short: its length used to set the dimension, and the search of every
    # query then failed with "queries must be (Q, 16), got (1, 15)"
    index, x = _gallery(tmp_path)
    queries = _queries(
        tmp_path / "q.parquet",
        [
            ("short", "ok", _floats(x[7][:-1])),
            ("long", "ok", [float(x[7][-1]), *_floats(x[8])]),
            ("wide", "ok", [0.25] * 32),
            ("good", "ok", _floats(x[4])),
        ],
    )
    args = ["reid", "search", "--index", index, "--embeddings", queries, "--k", "1"]
    assert main([*args, "--max-error-rate", "0.9"]) == 0
    text = capsys.readouterr().out
    assert "queries: 1 searched, 3 failed" in text
    assert "failed 'short': embedding has 15 values, expected 16" in text
    assert "failed 'long': embedding has 17 values, expected 16" in text
    assert "failed 'wide': embedding has 32 values, expected 16" in text
    assert "img-000004" in text  # the good query still finds its own image


def test_eval_names_the_file_and_its_row(tmp_path: Path, capsys) -> None:
    x, _ = clustered(6, 4, 16, seed=6)
    rows = [_floats(v) for v in x]
    (tmp_path / "q").mkdir()
    _eval_table(tmp_path / "q" / "part-000.parquet", rows[:6])
    bad = rows[6:12]
    bad[3] = [bad[2][-1], *bad[3]]
    bad[2] = bad[2][:-1]
    second = tmp_path / "q" / "part-001.parquet"
    _eval_table(second, bad, first=6)
    _eval_table(tmp_path / "g.parquet", rows)
    args = ["reid", "eval", "--query", str(tmp_path / "q")]
    args += ["--gallery", str(tmp_path / "g.parquet")]
    assert main(args) == 1
    err = capsys.readouterr().err
    # the row within its own file (2), not within the concatenated table (8)
    assert f"query table: {second}: row 2 (image_id=e8) has status 'ok' but embedding has " in err
    assert "15 values, expected 16 (2 such rows in all)" in err


# -- item 4: model versions ------------------------------------------------------------------------
def test_eval_model_mismatch_names_the_files(tmp_path: Path, capsys) -> None:
    x, _ = clustered(5, 4, 16, seed=7)
    rows = [_floats(v) for v in x]
    _eval_table(tmp_path / "q.parquet", rows[:8], model_version="v2")
    _eval_table(tmp_path / "g.parquet", rows, model_version="v1")
    args = ["reid", "eval", "--query", str(tmp_path / "q.parquet")]
    args += ["--gallery", str(tmp_path / "g.parquet")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"query embeddings (in {tmp_path / 'q.parquet'}) come from model_version ['v2']" in err
    assert f"gallery (in {tmp_path / 'g.parquet'}) from ['v1']" in err
    assert "--allow-model-mismatch" in err
    assert main([*args, "--allow-model-mismatch", "--json"]) == 0


def _manifest(tmp_path: Path, names: list[str]) -> str:
    pq.write_table(
        pa.table({"image_id": names, "uri": [f"crops/{n}.jpg" for n in names]}),
        tmp_path / "queries.parquet",
    )
    return str(tmp_path / "queries.parquet")


def test_search_manifest_refuses_a_model_of_another_version_before_embedding(
    ray_session, tmp_path: Path, reid_dir: Path, capsys
) -> None:
    from vbatch.models import load_model

    # the gallery comes from "reid-v1", the TINY model's version is its weights' hash: every
    # query used to be embedded, then come back as an error row (exit 3)
    index, _ = _gallery(tmp_path, dim=load_model("reid", reid_dir).embed_dim)
    (tmp_path / "crops").mkdir()
    (tmp_path / "crops" / "a.jpg").write_bytes(encode(person_crop(0, 1), quality=95))
    out = tmp_path / "hits"
    args = ["reid", "search", "--index", index, "--manifest", _manifest(tmp_path, ["a"])]
    args += ["--model-dir", str(reid_dir), "--out", str(out)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"the model at {reid_dir} is model_version '" in err
    assert f"the gallery at {index} holds 'reid-v1'" in err and "--allow-model-mismatch" in err
    assert not out.exists()  # refused before anything ran


# -- item 5: non-finite and zero vectors -----------------------------------------------------------
def test_vector_problems_name_each_kind() -> None:
    x = np.ones((5, 4), np.float32)
    x[1, 2] = math.nan
    x[2] = 0
    x[3] = 1e30
    x[4, 0] = -math.inf
    assert vector_problems(x) == [
        None,
        "non-finite embedding (NaN or inf)",
        "zero-norm embedding",
        "embedding too large to normalise",
        "non-finite embedding (NaN or inf)",
    ]


def test_nan_and_zero_queries_are_error_rows_counted_in_the_summary(tmp_path: Path, capsys) -> None:
    index, x = _gallery(tmp_path)
    queries = _queries(
        tmp_path / "q.parquet",
        [
            ("nan", "ok", [math.nan] * 16),
            ("zero", "ok", [0.0] * 16),
            ("inf", "ok", [math.inf, *_floats(x[1][1:])]),
            ("good", "ok", _floats(x[2])),
        ],
    )
    summary = tmp_path / "summary.json"
    args = ["reid", "search", "--index", index, "--embeddings", queries, "--k", "2"]
    # 3 of 4 queries failed: over --max-error-rate (exit 3); they used to count for nothing
    assert main([*args, "--summary-json", str(summary)]) == 3
    out = capsys.readouterr().out
    assert "failed 'nan': non-finite embedding (NaN or inf)" in out
    assert "failed 'zero': zero-norm embedding" in out
    assert "failed 'inf': non-finite embedding (NaN or inf)" in out
    assert "img-000002" in out
    record = json.loads(summary.read_text())
    assert record["by_status"] == {"ok": 1, "error": 3} and record["exit_code"] == 3
    assert record["queries"] == 4 and record["failed"] == 3
    assert {e["id"] for e in record["sample_errors"]} == {"nan", "zero", "inf"}


# -- item 6: search --manifest ---------------------------------------------------------------------
def test_search_manifest_without_out_says_it_is_a_batch_job(tmp_path: Path, capsys) -> None:
    index, _ = _gallery(tmp_path)
    args = ["reid", "search", "--index", index, "--manifest", _manifest(tmp_path, ["a"])]
    assert main([*args, "--model-dir", str(tmp_path)]) == 1
    assert "--manifest runs as a batch job: give --out" in capsys.readouterr().err


def test_search_manifest_whose_queries_all_fail_lists_them_and_leaves_no_temp_folder(
    ray_session, tmp_path: Path, reid_dir: Path, capsys, monkeypatch
) -> None:
    from vbatch.models import load_model
    from vbatch.operators.index import build_index

    predictor = load_model("reid", reid_dir)
    x, _ = clustered(4, 2, predictor.embed_dim, seed=8)
    write_embeddings(tmp_path / "gallery", x, model_version=predictor.model_version)
    build_index(str(tmp_path / "gallery"), str(tmp_path / "index"), Storage())
    (tmp_path / "crops").mkdir()
    (tmp_path / "crops" / "text.jpg").write_text("not an image")
    driver_tmp = tmp_path / "driver-tmp"
    driver_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(driver_tmp))
    out = tmp_path / "hits"
    args = ["reid", "search", "--index", str(tmp_path / "index")]
    args += ["--manifest", _manifest(tmp_path, ["text", "missing-1", "missing-2"])]
    args += ["--model-dir", str(reid_dir), "--out", str(out), "--k", "2", "--batch-size", "2"]
    args += ["--summary-json", str(tmp_path / "summary.json")]
    assert main(args) == 3  # finished and published; every query is an error row
    captured = capsys.readouterr()
    assert "reid search: 3 queries — 0 searched, 3 failed — 3 hit rows" in captured.out
    for name in ("text", "missing-1", "missing-2"):
        assert f"failed '{name}'" in captured.out
    assert "need at least one array" not in captured.out + captured.err
    rows = read_table(str(out), Storage()).to_pylist()
    assert sorted(r["query_id"] for r in rows) == ["missing-1", "missing-2", "text"]
    assert all(r["status"] == "error" and r["rank"] is None for r in rows)
    text = next(r for r in rows if r["query_id"] == "text")
    assert "not a recognised image format" in text["error"] and text["uri"].endswith("text.jpg")
    record = json.loads((tmp_path / "summary.json").read_text())
    assert record["by_status"] == {"error": 3} and record["rows"] == 3
    assert not [p.name for p in driver_tmp.iterdir() if p.name.startswith("vbatch-")]


# -- item 7: parameters are checked by the parser, and on the driver -------------------------------
@pytest.mark.parametrize(("option", "value"), [("--k", "0"), ("--k", "-2"), ("--rerank", "-1")])
def test_search_parameters_are_checked_by_the_parser(option: str, value: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["reid", "search", "--index", "i", "--embeddings", "e", option, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: must be >= " in err and err.rstrip().split(": ")[-1] != ""


def test_rerank_without_refinement_vectors_is_refused_before_the_job(
    ray_session, tmp_path: Path, capsys
) -> None:
    # used to fail inside every search actor, reported as a Ray task error
    index, x = _gallery(tmp_path)  # a flat gallery: no refinement vectors
    queries = _queries(tmp_path / "q.parquet", [("q", "ok", _floats(x[0]))])
    out = tmp_path / "hits"
    args = ["reid", "search", "--index", index, "--embeddings", queries, "--out", str(out)]
    assert main([*args, "--rerank", "2"]) == 1
    err = capsys.readouterr().err
    assert f"{index}: no refinement vectors to re-rank with" in err
    assert "RayTaskError" not in err and not out.exists()


# -- item 8: --image, one bad image among good ones ------------------------------------------------
def test_search_image_failures_set_the_exit_code_by_the_error_rate(
    tmp_path: Path, reid_dir: Path, capsys
) -> None:
    from vbatch.models import load_model
    from vbatch.operators.decode import decode_image

    predictor = load_model("reid", reid_dir)
    crops = []
    for i in range(3):
        crops.append(tmp_path / f"crop{i}.jpg")
        crops[-1].write_bytes(encode(person_crop(i, i), quality=95))
    vectors = predictor.predict([decode_image(c.read_bytes()) for c in crops])
    (tmp_path / "emb").mkdir()
    _queries(
        tmp_path / "emb" / "part.parquet",
        [(f"crop{i}", "ok", _floats(v)) for i, v in enumerate(vectors)],
        model_version=predictor.model_version,
    )
    fi.build_index(str(tmp_path / "emb"), str(tmp_path / "index"), Storage())
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(crops[1].read_bytes()[:150])
    base = ["reid", "search", "--index", str(tmp_path / "index"), "--model-dir", str(reid_dir)]
    args = [*base, "--image", str(crops[0]), "--image", str(corrupt), "--image", str(crops[2])]
    args += ["--k", "1", "--summary-json", "-"]
    # 1 of 3 failed: over the default --max-error-rate of 1 % (exit 3), under 0.5 (exit 0)
    assert main(args) == 3
    out = capsys.readouterr().out
    assert f"failed '{corrupt}': cannot read image {corrupt}" in out
    assert "queries: 2 searched, 1 failed" in out and "crop0" in out and "crop2" in out
    record = json.loads(out.strip().splitlines()[-1])
    assert record["status"] == "too_many_errors" and record["by_status"] == {"ok": 2, "error": 1}
    assert record["sample_errors"][0]["id"] == str(corrupt)
    assert main([*args, "--max-error-rate", "0.5"]) == 0
    # every image unreadable: nothing to search, exit 1 with the files named
    assert main([*base, "--image", str(corrupt), "--k", "1"]) == 1
    assert f"all 1 queries failed, nothing to search ({corrupt}: cannot read image" in (
        capsys.readouterr().err
    )


# -- item 9: a damaged index is named with what is wrong -------------------------------------------
@pytest.fixture
def index_dir(tmp_path: Path) -> Path:
    x, _ = clustered(5, 4, 16, seed=9)
    write_embeddings(tmp_path / "emb", x)
    fi.build_index(str(tmp_path / "emb"), str(tmp_path / "index"), Storage())
    return tmp_path / "index"


def _edit(index: Path, **changes) -> None:
    data = json.loads((index / "index.json").read_text())
    data.update(changes)
    (index / "index.json").write_text(json.dumps(data))


def test_no_index_says_so(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        fi.GalleryIndex.open(str(tmp_path / "nowhere"), Storage())
    assert str(err.value) == (
        f"no gallery index at {tmp_path / 'nowhere'}: {tmp_path / 'nowhere' / 'index.json'} does "
        "not exist (build one with `vbatch reid index`)"
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"metric": ["l2"]}, r"unknown metric \['l2'\]"),  # was: TypeError unhashable type
        ({"factory": 5}, "factory must be a faiss factory string, got 5"),
        ({"factory": ""}, "factory must be a faiss factory string"),
        ({"model_version": 3}, "model_version must be a string or null, got 3"),
        ({"history": "x"}, "history must be a list, got str"),
    ],
)
def test_manifest_values_of_the_wrong_type_are_refused(index_dir: Path, changes, message) -> None:
    _edit(index_dir, **changes)
    with pytest.raises(ValueError, match=message) as err:
        fi.GalleryIndex.open(str(index_dir), Storage())
    assert f"{index_dir / 'index.json'}: " in str(err.value)
    assert "the manifest is damaged" in str(err.value)


@pytest.mark.parametrize("what", ["index file", "id part"])
def test_files_the_manifest_names_but_the_store_lacks_are_named(
    index_dir: Path, what: str, capsys
) -> None:
    info = fi.read_info(str(index_dir), Storage())
    missing = index_dir / (info.index_file if what == "index file" else info.id_parts[0])
    missing.unlink()
    for mmap in (True, False):
        with pytest.raises(ValueError) as err:
            fi.GalleryIndex.open(str(index_dir), Storage(), mmap=mmap)
        assert str(err.value) == (
            f"{missing}: missing, but index.json names it; the index is damaged, rebuild it"
        )
    buf = io.BytesIO()
    pq.write_table(pa.table({"image_id": ["q"], "embedding": [[1.0] * 16]}), buf)
    (index_dir.parent / "q.parquet").write_bytes(buf.getvalue())
    args = ["reid", "search", "--index", str(index_dir), "--embeddings"]
    assert main([*args, str(index_dir.parent / "q.parquet")]) == 1
    assert f"error: {missing}: missing, but index.json names it" in capsys.readouterr().err
