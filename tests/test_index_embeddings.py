"""Embeddings tables are checked row by row before anything is indexed (issue 17 items 2, 5)."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.index_data import clustered, write_embeddings
from vbatch.operators import index as fi
from vbatch.operators.index.embeddings import vector_problems, vectors_from_arrow
from vbatch.operators.storage import Storage


def _variable_table(vectors: list[list[float]], model_version: str = "reid-v1") -> pa.Table:
    return pa.table(
        {
            "image_id": [f"img-{i:06d}" for i in range(len(vectors))],
            "status": ["ok"] * len(vectors),
            "embedding": pa.array(vectors, pa.list_(pa.float32())),
            "model_version": [model_version] * len(vectors),
        }
    )


def _shifted(x: np.ndarray) -> list[list[float]]:
    """Rows 7 and 8 of ``x`` with one value moved from row 7 to row 8: D-1 and D+1 values that
    add up to 2·D, so a total-size check passes."""
    rows = [list(map(float, v)) for v in x]
    rows[8] = [rows[7][-1], *rows[8]]
    rows[7] = rows[7][:-1]
    return rows


def test_vectors_from_arrow_checks_each_row():
    x, _ = clustered(2, 5, 8, seed=0)
    rows = _shifted(x)
    rows[2] = [math.nan, *rows[2][1:]]
    rows[3] = [0.0] * 8
    rows[4] = None
    checked = vectors_from_arrow(pa.array(rows, pa.list_(pa.float32())))
    vectors, problems, dim = checked.vectors, checked.problems, checked.dim
    assert dim == 8 and vectors.shape == (10, 8)
    assert checked.bad.tolist() == [2, 3, 4, 7, 8]
    assert problems[7] == "embedding has 7 values, expected 8"
    assert problems[8] == "embedding has 9 values, expected 8"
    assert problems[2] == "non-finite embedding (NaN or inf)"
    assert problems[3] == "zero-norm embedding"
    assert problems[4] == "no embedding"
    good = [0, 1, 5, 6, 9]
    assert all(problems[i] is None for i in good)
    np.testing.assert_allclose(vectors[good], x[good], atol=1e-6)  # never shifted
    assert not vectors[[2, 3, 4, 7, 8]].any()
    # a fixed-size column of another dimension fails on every row
    fixed = pa.array([list(v) for v in x], pa.list_(pa.float32(), 8))
    assert set(vectors_from_arrow(fixed, dim=16).problems) == {
        "embedding has 8 values, expected 16"
    }
    assert vector_problems(np.full((1, 4), 1e30, np.float32)) == [
        "embedding too large to normalise"
    ]


def test_index_and_add_refuse_rows_of_shifted_lengths(tmp_path):
    storage = Storage()
    x, _ = clustered(10, 3, 16, seed=1)
    (tmp_path / "emb").mkdir()
    pq.write_table(_variable_table(_shifted(x)), tmp_path / "emb" / "part-000.parquet")
    with pytest.raises(ValueError, match=r"row 7 \(image_id=img-000007\).* 15 values, expected 16"):
        fi.build_index(str(tmp_path / "emb"), str(tmp_path / "index"), storage)
    assert not (tmp_path / "index" / "index.json").exists()

    write_embeddings(tmp_path / "good", x, prefix="g")
    fi.build_index(str(tmp_path / "good"), str(tmp_path / "index"), storage)
    with pytest.raises(ValueError, match=r"image_id=img-000007.* 15 values"):
        fi.add_to_index(str(tmp_path / "index"), str(tmp_path / "emb"), storage)
    assert fi.GalleryIndex.open(str(tmp_path / "index"), storage).ntotal == 30


@pytest.mark.parametrize(
    ("bad", "message"),
    [(0.0, "zero-norm embedding"), (math.nan, "non-finite embedding"), (math.inf, "non-finite")],
)
def test_index_and_add_refuse_zero_and_non_finite_vectors(tmp_path, bad, message):
    storage = Storage()
    x, _ = clustered(10, 3, 16, seed=2)
    broken = x.copy()
    broken[5] = bad
    write_embeddings(tmp_path / "broken", broken, n_files=1)
    with pytest.raises(ValueError, match=rf"image_id=img-000005\).*{message}"):
        fi.build_index(str(tmp_path / "broken"), str(tmp_path / "index"), storage)
    write_embeddings(tmp_path / "good", x, prefix="g")
    fi.build_index(str(tmp_path / "good"), str(tmp_path / "index"), storage)
    with pytest.raises(ValueError, match=rf"image_id=img-000005\).*{message}"):
        fi.add_to_index(str(tmp_path / "index"), str(tmp_path / "broken"), storage)


def test_gallery_search_refuses_invalid_queries(tmp_path):
    storage = Storage()
    x, _ = clustered(10, 3, 16, seed=3)
    write_embeddings(tmp_path / "emb", x)
    fi.build_index(str(tmp_path / "emb"), str(tmp_path / "index"), storage)
    gallery = fi.GalleryIndex.open(str(tmp_path / "index"), storage)
    queries = x[:3].copy()
    queries[1] = math.nan
    with pytest.raises(ValueError, match=r"1 of 3 queries cannot be searched: row 1 \(non-finite"):
        gallery.search(queries, k=2)
    queries[1] = 0
    with pytest.raises(ValueError, match="row 1 \\(zero-norm"):
        gallery.search(queries, k=2)
    with pytest.raises(ValueError, match="k must be >= 1"):
        gallery.search(x[:1], k=0)


def test_training_sample_is_distinct_table_rows_in_random_order(tmp_path) -> None:
    x, _ = clustered(300, 5, 16, seed=2)
    write_embeddings(tmp_path, x, n_files=3, error_every=17)
    storage = Storage()
    stats = fi.scan_embeddings(str(tmp_path), storage)
    ok_rows = np.concatenate(
        [b.vectors for b in fi.iter_embeddings(stats.files, storage, 16, batch_rows=64)]
    )
    sample, ordinals = fi.sample_embeddings(
        stats.files, storage, 16, stats.count, 200, seed=5, batch_rows=64
    )
    assert len(set(ordinals.tolist())) == 200
    assert not np.all(np.diff(ordinals) > 0)  # shuffled, not in table order
    assert np.array_equal(sample, ok_rows[ordinals])
    again, again_ordinals = fi.sample_embeddings(stats.files, storage, 16, stats.count, 200, seed=5)
    assert np.array_equal(again_ordinals, ordinals) and np.array_equal(again, sample)
