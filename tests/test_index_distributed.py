"""A gallery built (or extended) in shards on Ray workers is the single-process one, byte for byte.

Both builds run on the same table, with duplicate image_ids across files and error rows, so the
shard plan must skip exactly the rows a sequential add skips and number the rest the same way.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tests.index_data import clustered, write_embeddings
from vbatch.operators import index as fi
from vbatch.operators.index.embeddings import scan_embeddings
from vbatch.operators.index.refine import RefineVectors
from vbatch.operators.index.shards import append_index, list_sizes, plan_shards, reserve_lists
from vbatch.operators.index.store import read_id_map, read_info
from vbatch.operators.storage import Storage, join

DIM = 32


def _table(folder: Path, seed: int = 3, n_ids: int = 600, prefix: str = "img") -> np.ndarray:
    x, _ = clustered(n_ids, 5, DIM, seed=seed)
    write_embeddings(folder, x, prefix=prefix, n_files=4, error_every=211)
    # the same image_ids again in a fifth file (other vectors): a sequential add keeps the
    # first row of each id, so must the shards
    write_embeddings(folder, x[:300][::-1] * -1, prefix=prefix, n_files=1, file_name="repeat")
    return x


def test_reserved_lists_keep_their_entries_and_take_the_merge(tmp_path: Path) -> None:
    x, _ = clustered(200, 5, DIM, seed=1)
    index = faiss.index_factory(DIM, "IVF8,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x[:500])
    shard = faiss.clone_index(index)
    shard.reset()
    shard.add(x[500:])
    faiss.write_index(shard, str(tmp_path / "shard.faiss"))
    reference = faiss.clone_index(index)
    append_index(reference, tmp_path / "shard.faiss")

    before = list_sizes(index)
    reserve_lists(index, list_sizes(shard))
    assert np.array_equal(list_sizes(index), before)  # room made, nothing added
    append_index(index, tmp_path / "shard.faiss")
    assert index.ntotal == len(x)
    assert np.array_equal(faiss.serialize_index(index), faiss.serialize_index(reference))
    with pytest.raises(ValueError, match="3 list sizes for an index of 8 lists"):
        reserve_lists(index, np.ones(3, dtype=np.int64))


def _same_gallery(a: str, b: str, storage: Storage, queries: np.ndarray) -> None:
    ia, ib = read_info(a, storage), read_info(b, storage)
    assert storage.read_bytes(join(a, ia.index_file)) == storage.read_bytes(join(b, ib.index_file))
    assert read_id_map(ia, storage).equals(read_id_map(ib, storage))
    for field in ("count", "factory", "nprobe", "rerank", "tuned_recall", "refine_dtype"):
        assert getattr(ia, field) == getattr(ib, field), field
    assert len(ia.refine_parts) in (0, len(ia.id_parts))
    if ia.refine_parts:
        local = (
            [Path(join(a, p)) for p in ia.refine_parts],
            [Path(join(b, p)) for p in ib.refine_parts],
        )
        va, vb = RefineVectors(local[0]), RefineVectors(local[1])
        everything = np.arange(ia.count)
        assert np.array_equal(va.gather(everything), vb.gather(everything))
    ga, gb = fi.GalleryIndex.open(a, storage), fi.GalleryIndex.open(b, storage)
    sa, na = ga.search(queries, k=10)
    sb, nb = gb.search(queries, k=10)
    assert np.array_equal(na, nb) and np.array_equal(sa, sb)


def test_shard_plan_skips_what_a_sequential_add_skips(tmp_path: Path) -> None:
    storage = Storage()
    _table(tmp_path / "emb")
    stats = scan_embeddings(str(tmp_path / "emb"), storage)
    ids = []
    for f in stats.files:
        t = pq.read_table(f)
        ids += t.filter(pc.equal(t.column("status"), "ok")).column("image_id").to_pylist()
    seen: set[str] = set()
    expected = []
    for image_id in ids:
        expected.append(image_id not in seen)
        seen.add(image_id)
    shards = plan_shards(stats, storage, 3)
    assert len(shards) == 3
    keep = np.concatenate([s.keep for s in shards])
    assert keep.tolist() == expected and not keep[-300:].any()
    assert [s.lo for s in shards] == [0, *(s.hi for s in shards[:-1])]
    assert shards[-1].hi == stats.count
    assert [s.first_id for s in shards] == [0, *np.cumsum([s.added for s in shards])[:-1]]
    # the rows of the already-indexed ids are skipped, and the faiss ids continue after them
    indexed = pa.array(ids[:1000])
    again = plan_shards(stats, storage, 2, indexed=indexed)
    assert again[0].first_id == 1000
    assert not np.concatenate([s.keep for s in again])[:1000].any()
    assert sum(s.added for s in again) == len(set(ids) - set(ids[:1000]))


# what the automatic plan picks for large galleries under a tight budget, kept small here
RERANKED = {"factory": "IVF32,RaBitQ3", "refine": True, "sample_size": 2_000}
BUILDS = pytest.mark.parametrize(
    "kwargs",
    [
        RERANKED,
        {"factory": "OPQ8,IVF32,PQ8", "sample_size": 2_000},  # a pre-transform around the IVF
        {"memory_budget": 3_000 * 40},  # automatic, small: a code without lists, re-ranked
        {"factory": "Flat"},
    ],
    ids=["ivf-rabitq-reranked", "opq-ivf-pq", "auto-small", "flat"],
)


@BUILDS
def test_distributed_build_is_the_single_process_build(tmp_path: Path, ray_session, kwargs) -> None:
    storage = Storage()
    _table(tmp_path / "emb")
    one = fi.build_index(str(tmp_path / "emb"), str(tmp_path / "one"), storage, **kwargs)
    three = fi.build_index(
        str(tmp_path / "emb"), str(tmp_path / "three"), storage, workers=3, **kwargs
    )
    assert one.factory == kwargs.get("factory", one.factory)
    assert bool(one.refine_parts) == (kwargs.get("refine", False) or "factory" not in kwargs)
    assert three.history[-1]["workers"] == 3 and len(three.id_parts) == 3
    assert three.count == one.count == 600 * 5  # duplicates and error rows left out
    queries, _ = clustered(600, 1, DIM, seed=3, draw_seed=7)
    _same_gallery(str(tmp_path / "one"), str(tmp_path / "three"), storage, queries[:100])
    assert not (tmp_path / "three" / "_shards").exists()  # staging removed at the commit


@BUILDS
def test_the_index_does_not_depend_on_the_threads_it_is_built_with(
    tmp_path: Path, ray_session, kwargs
) -> None:
    """faiss' OPQ (and, for some dims, k-means) training gives other bits with other thread
    counts: the build trains with a fixed count wherever it runs, and gives the caller's back."""
    storage = Storage()
    _table(tmp_path / "emb")
    emb = str(tmp_path / "emb")
    caller = faiss.omp_get_max_threads()
    try:
        for threads in (1, 2):
            faiss.omp_set_num_threads(threads)
            info = fi.build_index(emb, str(tmp_path / f"threads-{threads}"), storage, **kwargs)
            assert faiss.omp_get_max_threads() == threads  # restored after training
    finally:
        faiss.omp_set_num_threads(caller)
    trains = "factory" not in kwargs or kwargs["factory"] != "Flat"
    assert info.train_threads == (1 if trains else None)

    def distributed_build_with_two_threads() -> tuple[int, int]:
        """A Ray task whose own tasks (train, shards, merge) inherit OMP_NUM_THREADS=2."""
        import ray

        seen = ray.get(ray.remote(num_cpus=1)(faiss.omp_get_max_threads).remote())
        fi.build_index(emb, str(tmp_path / "ray-2"), Storage(), workers=3, **kwargs)
        return faiss.omp_get_max_threads(), seen

    task = ray_session.remote(num_cpus=1, runtime_env={"env_vars": {"OMP_NUM_THREADS": "2"}})
    assert ray_session.get(task(distributed_build_with_two_threads).remote()) == (2, 2)
    queries, _ = clustered(600, 1, DIM, seed=3, draw_seed=7)
    for other in ("threads-2", "ray-2"):
        _same_gallery(str(tmp_path / "threads-1"), str(tmp_path / other), storage, queries[:100])


def test_distributed_add_is_the_single_process_add(tmp_path: Path, ray_session) -> None:
    storage = Storage()
    _table(tmp_path / "day1")
    x2 = _table(tmp_path / "day2", seed=4, n_ids=300, prefix="new")
    # day 2 repeats 100 of day 1's image_ids: skipped by both
    write_embeddings(tmp_path / "day2", x2[:100], prefix="img", n_files=1, file_name="old")
    fi.build_index(str(tmp_path / "day1"), str(tmp_path / "one"), storage, **RERANKED)
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    a = fi.add_to_index(str(tmp_path / "one"), str(tmp_path / "day2"), storage)
    b = fi.add_to_index(str(tmp_path / "two"), str(tmp_path / "day2"), storage, workers=2)
    assert a.added == b.added == 300 * 5 and a.skipped_existing == b.skipped_existing
    assert b.history[-1]["workers"] == 2 and len(b.id_parts) == 3
    queries, _ = clustered(300, 1, DIM, seed=4, draw_seed=8)
    _same_gallery(str(tmp_path / "one"), str(tmp_path / "two"), storage, queries[:100])
    # the same day again: nothing new, no new generation
    again = fi.add_to_index(str(tmp_path / "two"), str(tmp_path / "day2"), storage, workers=2)
    assert again.added == 0 and again.generation == b.generation


def test_distributed_build_on_object_storage(tmp_path: Path, ray_session, s3_server) -> None:
    """Shards leave their files on S3, the merge task fetches them: same gallery as locally."""
    storage = s3_server.storage()
    out = f"{s3_server.new_bucket()}/gallery"
    _table(tmp_path / "emb")
    fi.build_index(str(tmp_path / "emb"), str(tmp_path / "local"), storage, **RERANKED)
    info = fi.build_index(str(tmp_path / "emb"), out, storage, workers=2, **RERANKED)
    assert info.refine_parts and len(info.id_parts) == 2
    fs, path = storage.fs(out)
    fs.invalidate_cache()
    assert not [p for p in fs.find(path) if "/_shards/" in p]  # staging removed at the commit
    local = read_info(str(tmp_path / "local"), storage)
    assert storage.read_bytes(join(out, info.index_file)) == storage.read_bytes(
        join(str(tmp_path / "local"), local.index_file)
    )
    queries, _ = clustered(600, 1, DIM, seed=3, draw_seed=9)
    ga = fi.GalleryIndex.open(out, storage, cache_root=tmp_path / "cache")
    gb = fi.GalleryIndex.open(str(tmp_path / "local"), storage)
    assert np.array_equal(ga.search(queries[:50], k=10)[1], gb.search(queries[:50], k=10)[1])
