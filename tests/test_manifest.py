"""Reading an image manifest on Ray: every row once, in manifest order, with the same errors as the
single-table rules (``schemas.images.image_row_errors``), however the manifest is cut into blocks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vbatch.operators import manifest as manifest_mod
from vbatch.operators.manifest import ERROR, ROW, read_image_manifest
from vbatch.operators.storage import Storage
from vbatch.schemas.images import image_row_errors


def _write_manifest(folder: Path, n: int, seed: int = 0) -> tuple[list, list]:
    """``n`` rows over three files and an empty one: good rows, duplicates within and across files, null and blank
    ids, empty uris, a duplicate with an empty uri. Returns (ids, uris) in manifest order."""
    rng = np.random.default_rng(seed)
    ids: list[str | None] = [f"img-{i:05d}" for i in range(n)]
    uris: list[str | None] = [f"imgs/{i}.jpg" for i in range(n)]
    for i in rng.choice(n, n // 10, replace=False):
        ids[i] = ids[int(rng.integers(0, n))]  # a duplicate of any row, earlier or later
    ids[3], ids[7], ids[11] = None, "  ", ""
    uris[5], uris[9] = "", None
    ids[n - 1], uris[n - 1] = ids[0], " "  # a later duplicate that also has an empty uri
    folder.mkdir(parents=True)
    for f, part in enumerate(np.array_split(np.arange(n), 3)):
        table = pa.table(
            {
                "image_id": pa.array([ids[i] for i in part], pa.string()),
                "uri": pa.array([uris[i] for i in part], pa.string()),
                "shelf": pa.array(part, pa.int64()),
            }
        )
        pq.write_table(table, folder / f"part-{f}.parquet", row_group_size=50)
    pq.write_table(table.slice(0, 0), folder / "part-0-empty.parquet")  # read between 0 and 1
    return ids, uris


@pytest.mark.parametrize(("max_blocks", "rows_per_block"), [(2048, 16), (5, 4)])
def test_every_row_once_with_the_single_table_errors(
    ray_session, tmp_path, monkeypatch, max_blocks, rows_per_block
) -> None:
    ids, uris = _write_manifest(tmp_path / "m", 400)
    monkeypatch.setattr(manifest_mod, "MAX_BLOCKS", max_blocks)
    ds, info = read_image_manifest(str(tmp_path / "m"), Storage(), "mask", None, rows_per_block)
    expected = image_row_errors(ids, uris)
    assert ds.num_blocks() <= max_blocks + 3  # + one remainder per source file at most
    if max_blocks == 5:  # 400 rows in at most 5 blocks: larger than rows_per_block
        assert ds.num_blocks() >= 3
    table = pa.concat_tables(ray_session.get(ds.to_arrow_refs())).sort_by(ROW)
    assert table.column(ROW).to_pylist() == list(range(400))
    assert table.column("image_id").to_pylist() == ids
    assert table.column("shelf").to_pylist() == list(range(400))
    assert table.column(ERROR).to_pylist() == expected
    assert info.num_rows == 400 and info.num_bad_rows == sum(e is not None for e in expected)
    assert "duplicate image_id 'img-00000' (first at row 0" in expected[399]


def test_manifest_without_any_problem(ray_session, tmp_path) -> None:
    ids = [f"img-{i}" for i in range(50)]
    pq.write_table(pa.table({"image_id": ids, "uri": ["a.jpg"] * 50}), tmp_path / "m.parquet")
    ds, info = read_image_manifest(str(tmp_path / "m.parquet"), Storage(), "mask")
    table = pa.concat_tables(ray_session.get(ds.to_arrow_refs())).sort_by(ROW)
    assert table.column("image_id").to_pylist() == ids
    assert table.column(ERROR).null_count == 50 and info.num_bad_rows == 0


def test_limit_counts_duplicates_within_the_first_rows_only(ray_session, tmp_path) -> None:
    ids, uris = _write_manifest(tmp_path / "m", 300, seed=1)
    ds, info = read_image_manifest(str(tmp_path / "m"), Storage(), "mask", limit=120)
    table = pa.concat_tables(ray_session.get(ds.to_arrow_refs())).sort_by(ROW)
    assert table.column(ROW).to_pylist() == list(range(120))
    assert table.column(ERROR).to_pylist() == image_row_errors(ids[:120], uris[:120])
    assert info.num_rows == 120


@pytest.mark.parametrize("collide", [False, True])
def test_duplicates_found_from_hashes_even_when_they_collide(collide) -> None:
    """The driver's duplicate finding (hashes, then exact ids of repeated hashes) gives the
    single-table rules' answer, also when unrelated ids share a hash."""
    from vbatch.operators.manifest import duplicate_candidates, first_occurrences, id_hashes
    from vbatch.schemas.images import key_problems

    rng = np.random.default_rng(0)
    pool = [f"id{i}" for i in range(40)] + [None, "", " ", "\t"]
    ids = [pool[i] for i in rng.integers(0, len(pool), 500)]
    uris = [["u", "", None, " x "][i] for i in rng.integers(0, 4, 500)]
    arr = pa.array(ids, pa.string())
    codes = key_problems(arr, pa.array(uris, pa.string()))
    hashes = (  # every id of the same length hashes alike: the exact check must tell them apart
        np.array([len(v or "") for v in ids], dtype=np.uint64) if collide else id_hashes(arr)
    )
    candidates = duplicate_candidates(hashes, codes)
    later = first_occurrences(candidates, arr.take(pa.array(candidates, pa.int64())).to_pylist())
    expected = image_row_errors(ids, uris)
    got_duplicates = {r for r, e in enumerate(expected) if e and "duplicate" in e}
    assert set(later) == got_duplicates
    for row, first in later.items():
        assert f"(first at row {first}," in expected[row]


def test_empty_manifest_is_an_empty_dataset(ray_session, tmp_path) -> None:
    schema = pa.schema([("image_id", pa.string()), ("uri", pa.string()), ("shelf", pa.int64())])
    pq.write_table(schema.empty_table(), tmp_path / "m.parquet")
    ds, info = read_image_manifest(str(tmp_path / "m.parquet"), Storage(), "mask")
    assert info.num_rows == 0 and info.num_bad_rows == 0
    assert ds.count() == 0
    assert {"image_id", "uri", "shelf", ROW, ERROR} <= set(ds.schema().names)


def test_blocks_are_the_manifest_cut_whatever_the_files(ray_session, tmp_path) -> None:
    """The job's blocks are ``rows_per_block`` slices of each file, in manifest order, however
    Ray's reader would split a file: a one-file manifest of 38 rows is [32, 6] at 32 rows a block
    (the fault tests block the second slice and expect the first one staged), two files are cut
    each on its own."""
    one = tmp_path / "one.parquet"
    pq.write_table(pa.table({"image_id": [f"i{i}" for i in range(38)], "uri": ["u"] * 38}), one)
    ds, _ = read_image_manifest(str(one), Storage(), "mask", None, 32)
    blocks = ray_session.get(ds.to_arrow_refs())
    assert [b.num_rows for b in blocks] == [32, 6]
    assert [b.column(ROW).to_pylist() for b in blocks] == [list(range(32)), list(range(32, 38))]

    two = tmp_path / "two"
    two.mkdir()
    for f, rows in enumerate((range(0, 20), range(20, 45))):
        pq.write_table(
            pa.table({"image_id": [f"i{i}" for i in rows], "uri": ["u"] * len(rows)}),
            two / f"part-{f}.parquet",
        )
    ds, _ = read_image_manifest(str(two), Storage(), "mask", None, 16)
    assert [b.num_rows for b in ray_session.get(ds.to_arrow_refs())] == [16, 4, 16, 9]
