"""``--reuse``: a nightly run carries forward the rows an earlier run already did, on unchanged
images with the same model and options, and processes only what changed (operators.reuse).

The end-to-end tests run two nights of ``vbatch segment`` on the shared Ray instance, locally and
on the S3 test server: night two changes one image, adds one and keeps the rest; the carried rows
keep night one's ``processed_at`` (the model did not run on them) and their masks are copied.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vbatch.jobs.cli import main
from vbatch.jobs.config import reuse_fields
from vbatch.jobs.demo_data import encode, product_image
from vbatch.jobs.publish import read_table
from vbatch.jobs.segment import ImageJobConfig
from vbatch.operators.manifest import ERROR
from vbatch.operators.reuse import (
    FINGERPRINT,
    REUSE,
    Listing,
    fingerprint_of,
    keep,
    list_fingerprints,
    mark,
    model_identity,
    previous_run,
)
from vbatch.operators.storage import Storage, StorageOptions, join

# -- units -------------------------------------------------------------------------------------


def test_fingerprint_of_listing_entries() -> None:
    assert fingerprint_of({"name": "b/k", "size": 3, "ETag": '"abc"', "type": "file"}) == "etag:abc"
    assert fingerprint_of({"size": 3, "mtime": 1.5}) == "size:3;mtime:1.5"
    assert fingerprint_of({"size": 3}) is None  # no stamp: never reused


def test_listing_tells_changed_files_apart(tmp_path: Path) -> None:
    storage = Storage()
    (tmp_path / "a.jpg").write_bytes(b"aaaa")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jpg").write_bytes(b"bb")
    uris = ["a.jpg", str(tmp_path / "sub" / "b.jpg"), "missing.jpg", "https://h/x.jpg"]
    listing = list_fingerprints(uris, str(tmp_path), storage)
    assert listing.folders == 2  # one listing per folder, not a request per image
    from vbatch.operators.reuse import _location

    locs = [_location(u, str(tmp_path), storage) for u in uris]
    before = listing.lookup(locs)
    assert before[0] and before[1] and before[2] is None and before[3] is None
    time.sleep(0.01)
    (tmp_path / "a.jpg").write_bytes(b"aaaaa")  # new content, new size and mtime
    after = list_fingerprints(uris, str(tmp_path), storage).lookup(locs)
    assert after[0] != before[0] and after[1] == before[1]


def _manifest_batch(ids: list[str], uris: list[str], fps: list[str | None]) -> pa.Table:
    return pa.table(
        {
            "image_id": ids,
            "uri": uris,
            "etag": pa.array(fps, pa.string()),
            ERROR: pa.array([None] * len(ids), pa.string()),
        }
    )


def test_mark_matches_id_uri_and_fingerprint() -> None:
    from vbatch.operators.reuse import _row_keys

    earlier = _row_keys(
        pa.array(["a", "b", "c"]), pa.array(["a.jpg", "b.jpg", "c.jpg"]), pa.array(["1", "2", "3"])
    )
    batch = _manifest_batch(
        ["a", "b", "c", "d", "e"],
        ["a.jpg", "b.jpg", "moved/c.jpg", "d.jpg", "e.jpg"],
        ["1", "changed", "3", "4", None],
    )
    marked = mark(
        batch,
        fingerprint_column="etag",
        listing=None,
        base_uri="/x",
        storage=Storage(),
        previous_keys=np.sort(earlier),
    )
    assert marked.column(REUSE).to_pylist() == [True, False, False, False, False]
    assert marked.column(FINGERPRINT).to_pylist() == ["1", "changed", "3", "4", None]
    assert keep(marked, reused=True).column("image_id").to_pylist() == ["a"]
    assert keep(marked, reused=False).num_rows == 4


def _committed(out: Path, record: dict, run_id: str = "20261201T000000Z-aaaaaa") -> None:
    """A committed generation with no rows, whose _SUCCESS carries ``record``."""
    (out / "results" / run_id).mkdir(parents=True)
    marker = {**record, "run_id": run_id, "files": [], "rows": 0}
    (out / "results" / run_id / "_SUCCESS").write_text(json.dumps(marker))
    (out / "_LATEST").write_text(f"results/{run_id}\n")


def test_previous_run_refuses_other_model_or_options(tmp_path: Path) -> None:
    storage = Storage()
    config = ImageJobConfig("salient", "m", "d", "x", actors=2)
    options = reuse_fields(config)
    _committed(tmp_path, {"model_identity": "v1:aa", "options": options})
    assert "model differs" in (previous_run(str(tmp_path), storage, "v2:aa", options).reason or "")
    other = reuse_fields(dataclasses.replace(config, mask_size="model"))
    assert "mask_size" in (previous_run(str(tmp_path), storage, "v1:aa", other).reason or "")
    # where things are and how the pool is sized decide nothing
    moved = dataclasses.replace(config, out="y", actors=8, manifest="n", model_dir="e")
    assert reuse_fields(moved) == reuse_fields(config)
    assert "no finished run" in (
        previous_run(str(tmp_path / "nope"), storage, "v1:aa", options).reason or ""
    )


def test_previous_run_trusts_the_committed_generation_not_run_json(tmp_path: Path) -> None:
    """run.json is a convenience copy that a run failing after its commit leaves behind: what
    --reuse compares is the committed generation's own record."""
    storage = Storage()
    options = reuse_fields(ImageJobConfig("salient", "m", "d", "x"))
    # the generation _LATEST names was computed by model B; run.json still says model A
    _committed(tmp_path, {"model_identity": "B:bb", "options": options})
    (tmp_path / "run.json").write_text(
        json.dumps({"model_identity": "A:aa", "config": {"task": "salient"}})
    )
    assert "model differs" in (previous_run(str(tmp_path), storage, "A:aa", options).reason or "")
    # a generation committed before vbatch recorded the model reuses nothing
    legacy = tmp_path / "legacy"
    _committed(legacy, {})
    assert "no model identity" in (previous_run(str(legacy), storage, "A:aa", options).reason or "")


def test_model_identity_sees_config_files(tmp_path: Path) -> None:
    (tmp_path / "config.py").write_text("input_size = 320\n")
    first = model_identity("abc", tmp_path)
    (tmp_path / "config.py").write_text("input_size = 256\n")
    assert model_identity("abc", tmp_path) != first
    assert model_identity("abc", tmp_path).startswith("abc:")


def test_empty_listing_finds_nothing() -> None:
    assert Listing().lookup(["file:/a", None]) == [None, None]


def test_carry_forward_keeps_batch_order_copies_products_and_scores(tmp_path: Path) -> None:
    """Rows taken from two earlier files come back in the batch's order, their masks copied into
    the new --out, their ground-truth scores kept only where the ground truth is unchanged."""
    import datetime as dt

    from vbatch.operators.reuse import Previous, _row_keys, carry_forward
    from vbatch.schemas.images import image_results_schema

    storage = Storage()
    before, after = tmp_path / "before", tmp_path / "after"
    (before / "masks").mkdir(parents=True)
    schema = image_results_schema("mask")
    files = []
    for f, ids in enumerate((["a", "b"], ["c", "d"])):
        rows = []
        for image_id in ids:
            mask = before / "masks" / f"{image_id}.png"
            mask.write_bytes(image_id.encode() * 3)
            rows.append(
                {
                    "image_id": image_id, "uri": f"{image_id}.jpg", "task": "salient",
                    "status": "ok", "width": 4, "height": 3, "model_version": "v1",
                    "processed_at": dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc),
                    "source_fingerprint": f"fp-{image_id}", "mask_uri": str(mask),
                    "foreground_ratio": 0.5,
                }
            )  # fmt: skip
        table = pa.Table.from_pylist(rows, schema=schema)
        table = table.append_column("gt_mae", pa.array([0.1] * 2, pa.float32()))
        table = table.append_column("gt_mask_uri", pa.array([f"gt/{i}.png" for i in ids]))
        files.append(str(tmp_path / f"part-{f}.parquet"))
        pq.write_table(table, files[-1])
    all_ids = ["a", "b", "c", "d"]
    keys = _row_keys(
        pa.array(all_ids),
        pa.array([f"{i}.jpg" for i in all_ids]),
        pa.array([f"fp-{i}" for i in all_ids]),
    )
    order = np.argsort(keys)
    previous = Previous(
        out=str(before),
        files=files,
        keys=keys[order],
        file_index=np.array([0, 0, 1, 1], np.int32)[order],
        row_index=np.array([0, 1, 0, 1], np.int64)[order],
    )
    batch_ids = ["d", "a", "c"]  # interleaves the two files
    batch = pa.table(
        {
            "image_id": batch_ids,
            "uri": [f"{i}.jpg" for i in batch_ids],
            "gt_mask_uri": ["gt/d.png", "gt/a-new.png", "gt/c.png"],
            "sku": ["x", "y", "z"],  # tonight's passthrough
            FINGERPRINT: [f"fp-{i}" for i in batch_ids],
        }
    )
    out = carry_forward(
        batch, previous=previous, out=str(after), task="salient", output="mask",
        embedding_dim=None, storage=storage,
    )  # fmt: skip
    assert out.column("image_id").to_pylist() == batch_ids
    assert out.column("sku").to_pylist() == ["x", "y", "z"]
    assert out.column("status").to_pylist() == ["ok"] * 3
    for image_id, uri in zip(batch_ids, out.column("mask_uri").to_pylist(), strict=True):
        assert uri == str(after / "masks" / f"{image_id}.png")
        assert Path(uri).read_bytes() == image_id.encode() * 3
    assert out.column("gt_mae").to_pylist()[0] == pytest.approx(0.1)
    assert out.column("gt_mae").to_pylist()[1] is None  # its ground truth changed
    assert "ground truth changed" in out.column("gt_error").to_pylist()[1]
    assert out.column("gt_error").to_pylist()[2] is None


# -- end to end --------------------------------------------------------------------------------


def _write_images(folder: Path, seeds: dict[str, int]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, seed in seeds.items():
        (folder / f"{name}.jpg").write_bytes(encode(product_image(seed, (72, 56))))


def _manifest(path: Path, names: list[str], prefix: str) -> str:
    pq.write_table(
        pa.table({"image_id": names, "uri": [f"{prefix}{n}.jpg" for n in names]}), str(path)
    )
    return str(path)


def _by_id(table: pa.Table) -> dict[str, dict]:
    return {r["image_id"]: r for r in table.to_pylist()}


def _two_nights(
    tmp_path: Path,
    salient_dir: Path,
    images: str,
    out1: str,
    out2: str,
    storage: Storage,
    put: callable,  # type: ignore[valid-type]
    extra: list[str],
) -> tuple[dict[str, dict], dict[str, dict], dict]:
    names = [f"img{i}" for i in range(8)]
    for i, n in enumerate(names):
        put(n, i)
    manifest1 = _manifest(tmp_path / "night1.parquet", names, images)
    args = [
        "segment",
        "--task",
        "salient",
        "--model-dir",
        str(salient_dir),
        "--actors",
        "1",
        *extra,
    ]
    assert main([*args, "--manifest", manifest1, "--out", out1, "--reuse", out1]) == 0
    night1 = _by_id(read_table(out1, storage))
    assert all(r["source_fingerprint"] for r in night1.values())  # recorded for the next night

    time.sleep(0.05)
    put("img3", 100)  # changed content
    put("img8", 8)  # new image
    manifest2 = _manifest(tmp_path / "night2.parquet", [*names, "img8"], images)
    summary = tmp_path / "summary.json"
    started = time.time()
    assert (
        main(
            [
                *args,
                "--manifest",
                manifest2,
                "--out",
                out2,
                "--reuse",
                out1,
                "--summary-json",
                str(summary),
            ]
        )
        == 0
    )
    night2 = _by_id(read_table(out2, storage))
    record = json.loads(summary.read_text())
    assert started > 0
    return night1, night2, record


def _check_nights(night1: dict, night2: dict, record: dict, storage: Storage, out2: str) -> None:
    assert sorted(night2) == sorted([*night1, "img8"])  # every manifest row exactly once
    assert record["reused_rows"] == 7
    redone = {
        i
        for i, r in night2.items()
        if i not in night1 or r["processed_at"] != night1[i]["processed_at"]
    }
    assert redone == {"img3", "img8"}  # the model ran only on the changed and the new image
    for image_id, row in night2.items():
        assert row["status"] == "ok"
        assert row["mask_uri"].startswith(out2)  # products live in tonight's --out
        mask = storage.read_bytes(row["mask_uri"])
        if image_id not in redone:
            assert mask == storage.read_bytes(night1[image_id]["mask_uri"])
            assert row["source_fingerprint"] == night1[image_id]["source_fingerprint"]
    assert night2["img3"]["source_fingerprint"] != night1["img3"]["source_fingerprint"]


def test_reuse_local(ray_session, tmp_path: Path, salient_dir: Path) -> None:
    storage = Storage()
    images = tmp_path / "images"

    def put(name: str, seed: int) -> None:
        _write_images(images, {name: seed})

    out1, out2 = str(tmp_path / "night1"), str(tmp_path / "night2")
    night1, night2, record = _two_nights(
        tmp_path, salient_dir, f"{images}/", out1, out2, storage, put, []
    )
    _check_nights(night1, night2, record, storage, out2)


def test_reuse_on_s3_copies_server_side(
    ray_session, s3_server, tmp_path: Path, salient_dir: Path
) -> None:
    bucket = s3_server.new_bucket()
    storage = Storage(StorageOptions(endpoint_url=s3_server.endpoint))

    def put(name: str, seed: int) -> None:
        storage.write_bytes(
            join(bucket, "images", f"{name}.jpg"), encode(product_image(seed, (72, 56)))
        )

    out1, out2 = join(bucket, "night1"), join(bucket, "night2")
    night1, night2, record = _two_nights(
        tmp_path,
        salient_dir,
        join(bucket, "images") + "/",
        out1,
        out2,
        storage,
        put,
        ["--s3-endpoint", s3_server.endpoint],
    )
    assert all(r["source_fingerprint"].startswith("etag:") for r in night2.values())
    _check_nights(night1, night2, record, storage, out2)
