"""Gallery index planning: memory sizes, the factory for a gallery size and budget."""

from __future__ import annotations

import os

import faiss
import numpy as np
import pytest

from tests.index_data import clustered
from vbatch.operators.index import plan as fi


def test_parse_bytes():
    assert fi.parse_bytes("512MB") == 512_000_000
    assert fi.parse_bytes("2GiB") == 2 * 1024**3
    assert fi.parse_bytes("1.5g") == 1_500_000_000
    assert fi.parse_bytes(1000) == 1000
    assert fi.parse_bytes(None) is None
    with pytest.raises(ValueError):
        fi.parse_bytes("lots")


def test_small_gallery_is_exact():
    assert fi.choose_factory(5_000, 1536).factory == "Flat"
    assert fi.choose_factory(5_000, 1536, memory_budget="100MB").factory == "Flat"
    # 5k x 1536 x 4 B = 30.7 MB flat: a 10 MB budget needs 2000 B/vector -> SQ8 (1536 B)
    assert fi.choose_factory(5_000, 1536, memory_budget=10_000_000).factory == "SQ8"
    # 900 B/vector: RaBitQ with 4 bits per dimension (768 B + 20 B of correction factors)
    small = fi.choose_factory(5_000, 1536, memory_budget=4_500_000)
    assert small.factory == "RaBitQ4" and small.bytes_per_vector == 788


def test_rabitq_code_bytes_match_faiss_index_files(tmp_path):
    # the planner's per-vector sizes are what faiss actually writes (minus a fixed header)
    x, _ = clustered(100, 10, 64, seed=7)
    for bits in (2, 3, 7):
        index = faiss.index_factory(64, f"RaBitQ{bits}", faiss.METRIC_INNER_PRODUCT)
        index.train(x)
        sizes = []
        for n in (500, 1000):
            index.reset()
            index.add(x[:n])
            faiss.write_index(index, str(tmp_path / "i.faiss"))
            sizes.append(os.path.getsize(tmp_path / "i.faiss"))
        assert (sizes[1] - sizes[0]) / 500 == fi.rabitq_code_bytes(64, bits) == 64 * bits / 8 + 20


def test_large_gallery_tiers_follow_budget():
    n, d = 200_000, 1536
    # nlist: power of two in [4, 8] * sqrt(N) = [1789, 3578] -> 2048, and 100k train / 39 >= 2048
    plan = fi.choose_factory(n, d, None, n_train=100_000)
    assert plan.factory == "IVF2048,Flat" and plan.nlist == 2048
    assert 4 * np.sqrt(n) <= plan.nlist <= 16 * np.sqrt(n)
    # too few training vectors lowers nlist so that each list gets >= 39 of them
    assert fi.choose_factory(n, d, None, n_train=40_000).nlist == 1024
    flat = n * d * 4
    assert fi.choose_factory(n, d, flat * 2, 100_000).factory == "IVF2048,Flat"
    assert fi.choose_factory(n, d, flat // 2, 100_000).factory == "IVF2048,SQ8"
    # 1000 B/vector - 8 B id - 63 B centroids leaves 929 B: RaBitQ4 (788 B)
    assert fi.choose_factory(n, d, n * 1000, 100_000).factory == "IVF2048,RaBitQ4"
    # 8x smaller than flat: 768 - 8 - 63 = 697 B: RaBitQ3 (596 B); 7 bits under SQ8's size
    eight = fi.choose_factory(n, d, flat // 8, 100_000)
    assert eight.factory == "IVF2048,RaBitQ3"
    assert eight.bytes_per_vector + 2048 * d * 4 / n <= flat / n / 8
    assert fi.choose_factory(n, d, n * 1480, 100_000).factory == "IVF2048,RaBitQ7"
    # under 2 bits per dimension (404 B): 8-bit PQ with 256 sub-quantizers (6 dims each) rotated
    assert fi.choose_factory(n, d, n * 400, 100_000).factory == "OPQ256,IVF2048,PQ256"
    # very tight: fewer sub-quantizers than dim/4 -> OPQ rotation first
    tight = fi.choose_factory(n, d, n * 200, 100_000)
    assert tight.factory == "OPQ96,IVF2048,PQ96"
    with pytest.raises(ValueError, match="too small"):
        fi.choose_factory(n, d, n * 10, 100_000)
