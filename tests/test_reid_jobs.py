"""`vbatch reid` end to end on the S3 server: embed → index → add → search → eval, through the CLI."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vbatch.jobs.cli import main
from vbatch.jobs.demo_data import encode, person_crop
from vbatch.jobs.publish import read_table
from vbatch.models import load_model
from vbatch.operators.storage import Storage, join


def _day(storage, root: str, day: int, n: int) -> str:
    rows = []
    for i in range(n):
        pid, cam = i % 5, (i + day) % 3
        image_id = f"d{day}-{i}"
        storage.write_bytes(
            join(root, "crops", f"{image_id}.jpg"),
            encode(person_crop(100 * day + i, pid), quality=95),
        )
        rows.append(
            {
                "image_id": image_id,
                "uri": f"crops/{image_id}.jpg",
                "person_id": pid,
                "camera_id": cam,
            }
        )
    rows.append(
        {"image_id": f"d{day}-broken", "uri": "crops/missing.jpg", "person_id": 1, "camera_id": 0}
    )
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    storage.write_bytes(join(root, f"day{day}.parquet"), buf.getvalue())
    return join(root, f"day{day}.parquet")


def test_embed_index_add_search_eval(ray_session, s3_server, reid_dir: Path, capsys) -> None:
    storage = s3_server.storage()
    bucket = s3_server.new_bucket()
    s3 = ["--s3-endpoint", s3_server.endpoint]
    model = join(bucket, "models", "reid")
    for f in reid_dir.iterdir():
        storage.put_file(f, join(model, f.name))

    day1, day2 = _day(storage, bucket, 1, 12), _day(storage, bucket, 2, 6)
    for day, manifest in (("1", day1), ("2", day2)):
        assert (
            main(
                [
                    "reid",
                    "embed",
                    "--manifest",
                    manifest,
                    "--model-dir",
                    model,
                    "--out",
                    join(bucket, f"emb{day}"),
                    "--batch-size",
                    "4",
                    # each day holds one missing image (1 of 7 rows on day 2): over the
                    # default --max-error-rate of 1 %, which would exit 3
                    "--max-error-rate",
                    "0.2",
                    # (its default is auto, bf16 on this CPU: the API comparison below is fp32)
                    "--precision",
                    "fp32",
                    *s3,
                ]
            )
            == 0
        )
    emb1 = read_table(join(bucket, "emb1"), storage)
    dim = load_model("reid", reid_dir).embed_dim
    typ = emb1.schema.field("embedding").type
    assert emb1.num_rows == 13 and typ.list_size == dim and typ.value_type == pa.float32()
    ok = emb1.filter(pa.compute.equal(emb1.column("status"), "ok"))
    vecs = np.stack(ok.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert emb1.column("person_id").type == pa.int64()  # passthrough kept its type
    broken = emb1.filter(pa.compute.equal(emb1.column("image_id"), "d1-broken")).to_pylist()[0]
    assert (
        broken["status"] == "error"
        and broken["embedding"] is None
        and "object not found" in broken["error"]
    )

    # the pipeline's vector is the Python API's, normalised
    predictor = load_model("reid", reid_dir)
    from vbatch.operators.decode import decode_image

    first = ok.to_pylist()[0]
    raw = predictor.predict([decode_image(storage.read_bytes(join(bucket, first["uri"])))])[0]
    np.testing.assert_allclose(first["embedding"], raw / np.linalg.norm(raw), atol=1e-5)

    index = join(bucket, "index")
    assert main(["reid", "index", "--embeddings", join(bucket, "emb1"), "--out", index, *s3]) == 0
    info = json.loads(storage.read_bytes(join(index, "index.json")))
    assert info["count"] == 12
    # day 2 added by two Ray tasks and a merge task (the index on the S3 server)
    add = ["reid", "add", "--index", index, "--embeddings", join(bucket, "emb2"), "--workers", "2"]
    assert main([*add, *s3]) == 0
    info = json.loads(storage.read_bytes(join(index, "index.json")))
    assert info["count"] == 18 and info["history"][-1]["workers"] == 2
    capsys.readouterr()

    # every day-2 image finds itself first (score 1), through the index that now holds it: the
    # batch job on Ray, its search actors mapping the gallery from the node cache
    out = join(bucket, "hits")
    assert (
        main(
            [
                "reid",
                "search",
                "--index",
                index,
                "--embeddings",
                join(bucket, "emb2"),
                "--k",
                "3",
                "--out",
                out,
                # 1 of the 7 queries is the failed embedding: over the default --max-error-rate
                "--max-error-rate",
                "0.2",
                *s3,
            ]
        )
        == 0
    )
    hits = read_table(out, storage).to_pylist()
    assert json.loads(storage.read_bytes(join(out, "_SUCCESS")))["rows"] == 7  # 6 ok + 1 error
    top1 = {h["query_id"]: h for h in hits if h["rank"] == 1}
    assert set(top1) == {f"d2-{i}" for i in range(6)}
    for q, h in top1.items():
        assert h["image_id"] == q and h["score"] == pytest.approx(1.0, abs=1e-4)
    # the error row of the embeddings table is a failed query, not silently dropped
    failed = [h for h in hits if h["status"] == "error"]
    assert [(h["query_id"], h["rank"]) for h in failed] == [("d2-broken", None)]
    assert "object not found" in failed[0]["error"]
    capsys.readouterr()

    # a manifest of query images: embedded and searched on Ray (nothing on the driver's disk),
    # its unreadable image an error row, its other columns passed through
    hits_uri = join(bucket, "manifest-hits")
    assert (
        main(
            [
                "reid",
                "search",
                "--index",
                index,
                "--manifest",
                day2,
                "--model-dir",
                model,
                "--k",
                "2",
                "--out",
                hits_uri,
                "--batch-size",
                "4",
                "--max-error-rate",
                "0.2",
                *s3,
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "reid search: 7 queries — 6 searched, 1 failed — 13 hit rows" in text
    assert "failed 'd2-broken'" in text
    rows = read_table(hits_uri, storage).to_pylist()
    assert len(rows) == 13 and {r["query_id"] for r in rows} == {f"d2-{i}" for i in range(6)} | {
        "d2-broken"
    }
    for r in rows:
        if r["rank"] == 1:
            assert r["image_id"] == r["query_id"] and r["score"] == pytest.approx(1.0, abs=1e-4)
        expected = 1 if r["query_id"] == "d2-broken" else int(r["query_id"][3:]) % 5
        assert r["person_id"] == expected  # the manifest's columns pass through
    broken = [r for r in rows if r["status"] == "error"]
    assert len(broken) == 1 and broken[0]["error_class"] is not None
    record = json.loads(storage.read_bytes(join(hits_uri, "run.json")))
    assert record["command"] == "reid search" and record["by_status"] == {"ok": 6, "error": 1}

    # query images embedded on the fly give the same top hit as their table embeddings
    assert (
        main(
            [
                "reid",
                "search",
                "--index",
                index,
                "--image",
                join(bucket, "crops", "d2-3.jpg"),
                "--model-dir",
                model,
                "--k",
                "1",
                *s3,
            ]
        )
        == 0
    )
    assert "d2-3" in capsys.readouterr().out

    assert (
        main(
            [
                "reid",
                "eval",
                "--query",
                join(bucket, "emb2"),
                "--gallery",
                join(bucket, "emb1"),
                *s3,
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "mAP" in text and "cmc@1" in text


# -- the search and eval commands on local files (no Ray) ------------------------------------------
def _gallery(
    tmp_path: Path, dim: int = 16, model_version: str = "reid-v1"
) -> tuple[str, np.ndarray]:
    from tests.index_data import clustered, write_embeddings
    from vbatch.operators.index import build_index
    from vbatch.operators.storage import Storage

    x, _ = clustered(10, 3, dim, seed=11)
    write_embeddings(tmp_path / "gallery", x, model_version=model_version)
    build_index(str(tmp_path / "gallery"), str(tmp_path / "index"), Storage())
    return str(tmp_path / "index"), x


def _queries(path: Path, rows: list, model_version: str = "reid-v1") -> str:
    """An embeddings table of queries: ``rows`` of (image_id, status, embedding or None)."""
    pq.write_table(
        pa.table(
            {
                "image_id": [r[0] for r in rows],
                "status": [r[1] for r in rows],
                "error": [None if r[1] == "ok" else "decode failed" for r in rows],
                "embedding": pa.array([r[2] for r in rows], pa.list_(pa.float32())),
                "model_version": [model_version] * len(rows),
            }
        ),
        path,
    )
    return str(path)


def test_search_reports_every_invalid_query_as_an_error_row(
    ray_session, tmp_path: Path, capsys
) -> None:
    index, x = _gallery(tmp_path)
    shifted_a, shifted_b = list(map(float, x[7][:-1])), [float(x[7][-1]), *map(float, x[8])]
    queries = _queries(
        tmp_path / "q.parquet",
        [
            ("good-0", "ok", list(map(float, x[0]))),
            ("nan", "ok", [float("nan")] * 16),
            ("zero", "ok", [0.0] * 16),
            ("short", "ok", shifted_a),  # 15 + 17 values: the old total-size check passed them
            ("long", "ok", shifted_b),
            ("broken", "error", None),
            ("good-20", "ok", list(map(float, x[20]))),
        ],
    )
    args = ["reid", "search", "--index", index, "--embeddings", queries, "--k", "2"]
    # in this process, printed; 5 of 7 failed is over the default --max-error-rate (exit 3)
    assert main(args) == 3
    text = capsys.readouterr().out
    assert "queries: 2 searched, 5 failed" in text
    assert (
        "failed 'nan': non-finite embedding" in text and "failed 'short': embedding has 15" in text
    )
    # the batch job on Ray: the same error rows, committed; 5 of 7 failed is over the default
    # --max-error-rate (exit 3), under 0.9
    out = tmp_path / "hits"
    assert main([*args, "--out", str(out)]) == 3
    assert main([*args, "--out", str(out), "--max-error-rate", "0.9"]) == 0
    assert "reid search: 7 queries — 2 searched, 5 failed" in capsys.readouterr().out
    hits = read_table(str(out), Storage()).to_pylist()
    assert sorted(h["query_id"] for h in hits) == sorted(
        ["good-0", "good-0", "nan", "zero", "short", "long", "broken", "good-20", "good-20"]
    )
    errors = {h["query_id"]: h["error"] for h in hits if h["status"] == "error"}
    assert errors == {
        "nan": "non-finite embedding (NaN or inf)",
        "zero": "zero-norm embedding",
        "short": "embedding has 15 values, expected 16",
        "long": "embedding has 17 values, expected 16",
        "broken": "decode failed",
    }
    assert all(h["rank"] is None and h["image_id"] is None for h in hits if h["status"] == "error")
    assert [h["image_id"] for h in hits if h["rank"] == 1] == ["img-000000", "img-000020"]

    # nothing left to search: a clear message and exit 1
    bad = _queries(tmp_path / "bad.parquet", [("nan", "ok", [float("nan")] * 16)])
    assert main(["reid", "search", "--index", index, "--embeddings", bad]) == 1
    assert "all 1 queries failed, nothing to search (nan: non-finite" in capsys.readouterr().err


def test_search_refuses_queries_of_another_model_version(tmp_path: Path, capsys) -> None:
    index, x = _gallery(tmp_path)
    queries = _queries(
        tmp_path / "q.parquet", [("q", "ok", list(map(float, x[3])))], model_version="reid-v2"
    )
    args = ["reid", "search", "--index", index, "--embeddings", queries, "--k", "1"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "queries come from model_version 'reid-v2'" in err and "'reid-v1'" in err
    assert "--allow-model-mismatch" in err
    assert main([*args, "--allow-model-mismatch"]) == 0
    assert "img-000003" in capsys.readouterr().out


@pytest.mark.parametrize("k", ["0", "-3", "two"])
def test_search_k_must_be_positive(k: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["reid", "search", "--index", "i", "--embeddings", "e", "--k", k])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --k:" in err and (">= 1" in err)


def test_search_image_names_a_corrupt_file_and_searches_the_others(
    tmp_path: Path, reid_dir: Path, capsys
) -> None:
    from vbatch.operators.decode import decode_image
    from vbatch.operators.index import build_index
    from vbatch.operators.storage import Storage

    predictor = load_model("reid", reid_dir)
    crops = []
    for i in range(4):
        crops.append(tmp_path / f"crop{i}.jpg")
        crops[-1].write_bytes(encode(person_crop(i, i % 2), quality=95))
    vectors = predictor.predict([decode_image(c.read_bytes()) for c in crops])
    (tmp_path / "emb").mkdir()
    _queries(
        tmp_path / "emb" / "part.parquet",
        [(f"crop{i}", "ok", list(map(float, v))) for i, v in enumerate(vectors)],
        model_version=predictor.model_version,
    )
    build_index(str(tmp_path / "emb"), str(tmp_path / "index"), Storage())
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(crops[2].read_bytes()[:200])
    args = ["reid", "search", "--index", str(tmp_path / "index"), "--model-dir", str(reid_dir)]
    images = [
        "--image",
        str(corrupt),
        "--image",
        str(crops[2]),
        "--image",
        str(tmp_path / "no.jpg"),
    ]
    # 2 of 3 queries failed: over the default --max-error-rate, exit 3 (the others are searched)
    assert main([*args, *images, "--k", "1"]) == 3
    text = capsys.readouterr().out
    assert "queries: 1 searched, 2 failed" in text
    assert f"failed '{corrupt}': cannot read image {corrupt}" in text
    assert f"cannot read image {tmp_path / 'no.jpg'}" in text
    assert "crop2" in text  # the good query still found its own crop


def test_eval_json_with_string_ids_and_no_status_column(tmp_path: Path, capsys) -> None:
    from tests.test_reid_eval import (
        GALLERY_CAM,
        GALLERY_PID,
        QUERY_CAM,
        SIMS,
        embeddings_with_similarities,
    )

    q, g = embeddings_with_similarities(SIMS)

    def write(name, vectors, pids, cams, version="v1"):
        pq.write_table(
            pa.table(
                {
                    "image_id": [f"{name}{i}" for i in range(len(pids))],
                    "embedding": pa.array(
                        [list(map(float, v)) for v in vectors], pa.list_(pa.float32())
                    ),
                    "person_id": [f"{p:04d}" if p >= 0 else str(p) for p in pids],
                    "camera_id": cams,
                    "model_version": [version] * len(pids),
                }
            ),
            tmp_path / f"{name}.parquet",
        )
        return str(tmp_path / f"{name}.parquet")

    query = write("q", q, [1, 2, 3], QUERY_CAM)
    gallery = write("g", g, GALLERY_PID, GALLERY_CAM)
    assert main(["reid", "eval", "--query", query, "--gallery", gallery, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["mAP"] == pytest.approx(7 / 12) and result["num_valid_query"] == 2
    assert result["cmc@1"] == pytest.approx(0.5) and result["cmc"][:3] == pytest.approx(
        [0.5, 0.5, 1]
    )
    assert main(["reid", "eval", "--query", query, "--gallery", gallery]) == 0
    assert "mAP     : 0.583333" in capsys.readouterr().out
    other = write("o", g, GALLERY_PID, GALLERY_CAM, version="v2")
    assert main(["reid", "eval", "--query", query, "--gallery", other]) == 1
    err = capsys.readouterr().err
    assert f"(in {query}) come from model_version ['v1'] and the gallery (in {other}) from" in err
    assert "from ['v2']" in err
    assert (
        main(["reid", "eval", "--query", query, "--gallery", other, "--allow-model-mismatch"]) == 0
    )
