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
from vbatch.operators.storage import join


@pytest.fixture(scope="module")
def reid_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vbatch.models.reid import TINY, write_random_model_dir

    return write_random_model_dir(tmp_path_factory.mktemp("reid") / "model", config=TINY)


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
    assert main(["reid", "add", "--index", index, "--embeddings", join(bucket, "emb2"), *s3]) == 0
    assert json.loads(storage.read_bytes(join(index, "index.json")))["count"] == 18
    capsys.readouterr()

    # every day-2 image finds itself first (score 1), through the index that now holds it
    out = join(bucket, "hits.parquet")
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
                *s3,
            ]
        )
        == 0
    )
    hits = pq.read_table(io.BytesIO(storage.read_bytes(out))).to_pylist()
    top1 = {h["query_id"]: h for h in hits if h["rank"] == 1}
    assert set(top1) == {f"d2-{i}" for i in range(6)}
    for q, h in top1.items():
        assert h["image_id"] == q and h["score"] == pytest.approx(1.0, abs=1e-4)

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
