"""Opening a gallery memory-mapped gives the searches of one read into memory (issue 13 item 3)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from tests.index_data import clustered, write_embeddings
from vbatch.operators import index as fi
from vbatch.operators.storage import Storage


def _mapped_files() -> str:
    return Path("/proc/self/maps").read_text() if os.path.exists("/proc/self/maps") else ""


@pytest.mark.parametrize(
    "factory", ["Flat", "IVF16,Flat", "IVF16,SQ8", "IVF16,RaBitQ3", "SQ8", "OPQ8,IVF16,PQ8", "PQ8"]
)
def test_mmap_open_searches_like_an_index_in_memory(tmp_path, factory):
    storage = Storage()
    x, _ = clustered(100, 10, 32, seed=8)
    write_embeddings(tmp_path / "emb", x)
    out = str(tmp_path / "index")
    info = fi.build_index(str(tmp_path / "emb"), out, storage, factory=factory)
    mapped = fi.GalleryIndex.open(out, storage)  # the default
    heap = fi.GalleryIndex.open(out, storage, mmap=False)
    queries, _ = clustered(100, 1, 32, seed=8, draw_seed=5)
    for nprobe in (None, 4):
        s1, n1 = mapped.search(queries, k=10, nprobe=nprobe)
        s2, n2 = heap.search(queries, k=10, nprobe=nprobe)
        np.testing.assert_array_equal(s1, s2)
        assert n1 == n2
    maps = _mapped_files()
    if maps:  # the local index file itself is mapped, not a copy
        assert str(tmp_path / "index" / info.index_file) in maps


def test_remote_index_is_cached_once_per_node_and_follows_generations(tmp_path, s3_server):
    storage = s3_server.storage()
    bucket = s3_server.new_bucket()
    x, _ = clustered(40, 10, 16, seed=9)
    write_embeddings(tmp_path / "day1", x[:300], prefix="d1")
    write_embeddings(tmp_path / "day2", x[300:], prefix="d2")
    emb1, emb2, index = f"{bucket}/day1", f"{bucket}/day2", f"{bucket}/index"
    for day, local in (("day1", tmp_path / "day1"), ("day2", tmp_path / "day2")):
        for f in local.iterdir():
            storage.put_file(f, f"{bucket}/{day}/{f.name}")
    fi.build_index(emb1, index, storage, factory="IVF8,Flat")
    cache = tmp_path / "cache"
    first = fi.GalleryIndex.open(index, storage, cache_root=cache)
    cached = sorted(cache.rglob("*.faiss"))
    assert len(cached) == 1 and str(cached[0]) in _mapped_files()
    mtime = cached[0].stat().st_mtime_ns
    again = fi.GalleryIndex.open(index, storage, cache_root=cache)
    assert sorted(cache.rglob("*.faiss")) == cached and cached[0].stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(first.search(x[:20], k=5)[0], again.search(x[:20], k=5)[0])

    fi.add_to_index(index, emb2, storage)
    after = fi.GalleryIndex.open(index, storage, cache_root=cache)
    now = sorted(cache.rglob("*.faiss"))
    assert len(now) == 1 and now != cached and now[0].name.endswith("index-00001.faiss")
    assert after.ntotal == 400
    heap = fi.GalleryIndex.open(index, storage, mmap=False)
    s1, n1 = after.search(x[280:320], k=5, nprobe=8)
    s2, n2 = heap.search(x[280:320], k=5, nprobe=8)
    np.testing.assert_array_equal(s1, s2)
    assert n1 == n2
    # the reader opened before the add still searches its own (unlinked, still mapped) copy
    assert first.search(x[:1], k=1)[1] == [["d1-000000"]]
