"""The batch search job's search stage, without Ray (issue 13 item 4); the job itself runs in
``tests/test_reid_jobs.py``."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from tests.index_data import clustered, write_embeddings
from vbatch.operators.index import GalleryIndex, build_index
from vbatch.operators.index.search_stage import SearchStage
from vbatch.operators.storage import Storage, StorageOptions


def test_search_stage_gives_k_hits_or_one_error_row_per_query_with_passthrough(tmp_path):
    x, _ = clustered(10, 3, 16, seed=11)
    write_embeddings(tmp_path / "gallery", x)
    index = str(tmp_path / "index")
    build_index(str(tmp_path / "gallery"), index, Storage(), factory="IVF2,RaBitQ4", refine=True)
    stage = SearchStage(
        index, StorageOptions(), k=2, nprobe=2, rerank=None, allow_model_mismatch=False
    )
    rows = [
        ("good-0", "ok", None, list(map(float, x[0])), "reid-v1"),
        ("broken", "error", "object not found: s3://b/q.jpg", None, "reid-v1"),
        ("nan", "ok", None, [float("nan")] * 16, "reid-v1"),
        ("other-model", "ok", None, list(map(float, x[5])), "reid-v2"),
        ("good-7", "ok", None, list(map(float, x[7])), "reid-v1"),
    ]
    batch = pa.table(
        {
            "image_id": [r[0] for r in rows],
            "status": [r[1] for r in rows],
            "error": pa.array([r[2] for r in rows], pa.string()),
            "embedding": pa.array([r[3] for r in rows], pa.list_(pa.float32())),
            "model_version": [r[4] for r in rows],
            "camera_id": pa.array([1, 2, 3, 4, 5], pa.int64()),
            "_vb_row": [0, 1, 2, 3, 4],  # internal columns do not pass through
        }
    )
    out = stage(batch).to_pylist()
    assert [(r["query_id"], r["rank"]) for r in out] == [
        ("good-0", 1), ("good-0", 2), ("broken", None), ("nan", None), ("other-model", None),
        ("good-7", 1), ("good-7", 2),
    ]  # fmt: skip
    assert [r["camera_id"] for r in out] == [1, 1, 2, 3, 4, 5, 5]
    assert "_vb_row" not in out[0] and "embedding" not in out[0]
    errors = {r["query_id"]: (r["error"], r["error_class"]) for r in out if r["status"] == "error"}
    assert errors["broken"] == ("object not found: s3://b/q.jpg", "not_found")
    assert errors["nan"][0] == "non-finite embedding (NaN or inf)"
    assert "model_version 'reid-v2'" in errors["other-model"][0]
    # the same hits as GalleryIndex.search (re-ranked: exact scores)
    gallery = GalleryIndex.open(index, Storage())
    scores, names = gallery.search(x[[0, 7]], k=2, nprobe=2)
    assert [r["image_id"] for r in out if r["status"] == "ok"] == [*names[0], *names[1]]
    np.testing.assert_allclose(
        [r["score"] for r in out if r["status"] == "ok"], scores.ravel(), rtol=1e-6
    )
    assert out[0]["image_id"] == "img-000000" and abs(out[0]["score"] - 1.0) < 1e-5
