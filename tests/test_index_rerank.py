"""Re-ranking with full-precision vectors kept beside the index (issue 13 item 5).

Near-tied data (many nearly identical images per identity) is where compact codes fail: a
query's exact top-10 are 10 of its identity's 40 vectors at scores a few thousandths apart.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import faiss
import numpy as np
import pytest

from tests.index_data import clustered, knn_recall, write_embeddings
from vbatch.operators import index as fi
from vbatch.operators.index.refine import NpyPartWriter, RefineVectors, rerank
from vbatch.operators.storage import Storage

DIM = 128


def _rows(gallery: fi.GalleryIndex, names: list[list[str | None]]) -> np.ndarray:
    rows = {n: i for i, n in enumerate(gallery.image_ids.to_pylist())}
    return np.array([[rows.get(n, -1) for n in r] for r in names])


@pytest.fixture
def near_tied(tmp_path) -> tuple[np.ndarray, np.ndarray, str]:
    x, _ = clustered(60, 40, DIM, seed=1, noise=0.05)
    write_embeddings(tmp_path / "emb", x)
    queries, _ = clustered(60, 1, DIM, seed=1, noise=0.05, draw_seed=7)
    return x, queries, str(tmp_path / "emb")


@pytest.mark.parametrize(
    ("factory", "refine"),
    [(None, None), ("IVF16,RaBitQ3", True)],  # the automatic plan; an explicit IVF, opted in
)
def test_rerank_reaches_target_recall_on_near_tied_data(tmp_path, near_tied, factory, refine):
    x, queries, emb = near_tied
    storage = Storage()
    out = str(tmp_path / "index")
    info = fi.build_index(
        emb, out, storage, factory=factory, memory_budget=len(x) * DIM * 4 // 8, refine=refine
    )
    assert info.refine_parts == ["refine/part-00000.npy"] and info.refine_dtype == "float32"
    assert info.rerank is not None and info.rerank > 1  # the codes alone do not reach the target
    assert (factory is None) == (info.nprobe is None)  # the auto plan is a small flat RaBitQ
    gallery = fi.GalleryIndex.open(out, storage)
    _, truth = faiss.knn(queries, x, 10, metric=faiss.METRIC_INNER_PRODUCT)

    scores, names = gallery.search(queries, k=10)  # the manifest's nprobe and rerank
    assert knn_recall(_rows(gallery, names), truth) >= 0.95
    # exact scores: the cosine of the query with each returned vector
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    rows = _rows(gallery, names)
    np.testing.assert_allclose(scores, np.einsum("qkd,qd->qk", x[rows], q), atol=1e-5)

    _, codes_only = gallery.search(queries, k=10, rerank=0)
    assert knn_recall(_rows(gallery, codes_only), truth) < 0.9


def test_rerank_over_every_candidate_is_exact_search(tmp_path):
    x = np.random.default_rng(3).standard_normal((400, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    write_embeddings(tmp_path / "emb", x)
    storage = Storage()
    out = str(tmp_path / "index")
    fi.build_index(str(tmp_path / "emb"), out, storage, factory="IVF8,RaBitQ2", refine=True)
    gallery = fi.GalleryIndex.open(out, storage)
    queries = np.random.default_rng(4).standard_normal((30, 32)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    # every list probed, every vector a candidate: re-ranking is exact search
    scores, names = gallery.search(queries, k=10, nprobe=8, rerank=40)
    exact_scores, exact = faiss.knn(queries, x, 10, metric=faiss.METRIC_INNER_PRODUCT)
    np.testing.assert_array_equal(_rows(gallery, names), exact)
    np.testing.assert_allclose(scores, exact_scores, atol=1e-6)
    # the codes alone order them differently
    assert not np.array_equal(_rows(gallery, gallery.search(queries, k=10, rerank=0)[1]), exact)


def test_add_appends_refinement_vectors_in_faiss_id_order(tmp_path):
    storage = Storage()
    x, _ = clustered(60, 10, 32, seed=5, noise=0.1)
    write_embeddings(tmp_path / "day1", x[:400], prefix="d1")
    new_ids = write_embeddings(tmp_path / "day2", x[400:], prefix="d2", error_every=50)
    out = str(tmp_path / "index")
    fi.build_index(str(tmp_path / "day1"), out, storage, factory="IVF4,RaBitQ2", refine=True)
    info = fi.add_to_index(out, str(tmp_path / "day2"), storage)
    assert info.refine_parts == ["refine/part-00000.npy", "refine/part-00001.npy"]
    assert info.count == 600
    gallery = fi.GalleryIndex.open(out, storage)
    assert gallery.refine is not None and len(gallery.refine) == 600
    # row i of the refinement vectors is faiss id i, whose image_id the id map names
    order = {n: i for i, n in enumerate(gallery.image_ids.to_pylist())}
    rows = [order[f"d2-{i:06d}"] for i in range(200)]
    np.testing.assert_allclose(gallery.refine.gather(np.array(rows)), x[400:], atol=1e-6)
    scores, names = gallery.search(x[[400, 599]], k=1, nprobe=4, rerank=600)
    assert [r[0] for r in names] == [new_ids[0], new_ids[-1]]
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    again = fi.add_to_index(out, str(tmp_path / "day2"), storage)  # nothing new: no new part
    assert again.added == 0 and again.refine_parts == info.refine_parts


def test_gallery_without_refinement_vectors_still_opens_and_adds(tmp_path):
    """A manifest written before re-ranking existed has no refine fields at all."""
    storage = Storage()
    x, _ = clustered(30, 10, 16, seed=6)
    write_embeddings(tmp_path / "day1", x[:200], prefix="d1")
    write_embeddings(tmp_path / "day2", x[200:], prefix="d2")
    out = tmp_path / "index"
    fi.build_index(str(tmp_path / "day1"), str(out), storage, factory="IVF4,RaBitQ2")
    manifest = json.loads((out / "index.json").read_text())
    for key in ("refine_parts", "refine_dtype", "rerank"):
        manifest.pop(key)
    (out / "index.json").write_text(json.dumps(manifest))

    gallery = fi.GalleryIndex.open(str(out), storage)
    assert gallery.refine is None
    _, names = gallery.search(x[:3], k=1, nprobe=4)
    assert [r[0] for r in names] == ["d1-000000", "d1-000001", "d1-000002"]
    with pytest.raises(ValueError, match="no refinement vectors"):
        gallery.search(x[:3], k=1, rerank=2)
    info = fi.add_to_index(str(out), str(tmp_path / "day2"), storage)
    assert info.refine_parts == [] and not (out / "refine").exists()
    assert fi.GalleryIndex.open(str(out), storage).ntotal == 300


def test_truncated_refine_part_names_the_file(tmp_path):
    storage = Storage()
    x, _ = clustered(20, 10, 16, seed=7)
    write_embeddings(tmp_path / "emb", x)
    out = tmp_path / "index"
    fi.build_index(str(tmp_path / "emb"), str(out), storage, factory="IVF4,SQ8", refine=True)
    part = out / "refine" / "part-00000.npy"
    with open(part, "r+b") as fh:
        fh.truncate(part.stat().st_size - 16)
    with pytest.raises(ValueError, match=r"refine/part-00000\.npy: truncated"):
        fi.GalleryIndex.open(str(out), storage)


def test_remote_refinement_vectors_are_cached_and_mapped(tmp_path, s3_server):
    storage = s3_server.storage()
    bucket = s3_server.new_bucket()
    x, _ = clustered(30, 10, 16, seed=8, noise=0.1)
    write_embeddings(tmp_path / "emb", x)
    for f in (tmp_path / "emb").iterdir():
        storage.put_file(f, f"{bucket}/emb/{f.name}")
    fi.build_index(f"{bucket}/emb", f"{bucket}/index", storage, factory="IVF4,RaBitQ2", refine=True)
    cache = tmp_path / "cache"
    remote = fi.GalleryIndex.open(f"{bucket}/index", storage, cache_root=cache)
    cached = sorted(cache.rglob("*.npy"))
    assert len(cached) == 1
    if os.path.exists("/proc/self/maps"):  # mapped from the node cache, not read into the heap
        assert str(cached[0]) in Path("/proc/self/maps").read_text()
    _, n = remote.search(x[:20], k=5, nprobe=4, rerank=60)
    _, exact = faiss.knn(x[:20], x, 5, metric=faiss.METRIC_INNER_PRODUCT)
    np.testing.assert_array_equal(_rows(remote, n), exact)


def test_npy_part_writer_round_trips_and_rerank_pads_missing_candidates(tmp_path):
    x = np.arange(24, dtype=np.float32).reshape(6, 4)
    with NpyPartWriter(tmp_path / "a.npy", 4) as part:
        part.write(x[:2])
        part.write(x[2:])
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), x)
    with NpyPartWriter(tmp_path / "b.npy", 4, "float16") as part:
        part.write(x[:3])
    vectors = RefineVectors([tmp_path / "a.npy", tmp_path / "b.npy"])
    assert len(vectors) == 9
    np.testing.assert_array_equal(vectors.gather(np.array([7, 0, 5])), x[[1, 0, 5]])
    q = np.array([[1, 0, 0, 0]], dtype=np.float32)
    scores, ids = rerank(q, np.array([[0, 5, -1]]), vectors, k=3)
    assert ids.tolist() == [[5, 0, -1]] and scores[0, 2] == -np.inf
