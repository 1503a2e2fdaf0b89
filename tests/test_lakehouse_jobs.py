"""``--table``: the row jobs commit their results to an Iceberg table, on the SeaweedFS REST catalog.

Two nights of the same catalog with a tenth of it changed leave one table with one row per image
(the changed rows from the second night, the others from the first), two snapshots whose
properties name both runs, and time travel to the first; ``--reuse iceberg:…`` skips the
unchanged images; a run that fails before its commit adds no snapshot; a table that cannot take
the job's results refuses it before any work. ``reid embed`` and ``video`` commit the same way.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vbatch.jobs.cli import main
from vbatch.jobs.demo_data import encode, person_crop, product_image
from vbatch.jobs.publish import FAULT_ENV
from vbatch.operators.lakehouse import IcebergTarget, read_current
from vbatch.operators.lakehouse.upsert import RUN_ID
from vbatch.operators.storage import Storage, join

IMAGES = 20


def _manifest(storage: Storage, root: str, changed: set[int], make=product_image) -> str:
    """IMAGES images; those in ``changed`` drawn differently (new content, same id and uri)."""
    for i in range(IMAGES):
        storage.write_bytes(
            join(root, "imgs", f"{i}.jpg"), encode(make(i + 1000 * (i in changed), (48, 40)))
        )
    table = pa.table(
        {
            "image_id": [f"p{i:02d}" for i in range(IMAGES)],
            "uri": [f"imgs/{i}.jpg" for i in range(IMAGES)],
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(join(root, "manifest.parquet"), buf.getvalue())
    return join(root, "manifest.parquet")


def _snapshots(target: IcebergTarget) -> list:
    from vbatch.operators.lakehouse.catalog import load_catalog, load_table

    table = load_table(load_catalog(target.catalog), target)
    return [] if table is None else list(table.snapshots())


def test_two_nights_of_segment_upsert_one_row_per_image(
    ray_session, s3_server, iceberg_catalog, salient_dir: Path, tmp_path: Path
) -> None:
    storage, bucket = s3_server.storage(), s3_server.new_bucket()
    name = "nightly.salient"
    target = IcebergTarget(name, iceberg_catalog.name)
    out = join(bucket, "out")

    def night(changed: set[int], summary: str, *more: str) -> dict:
        manifest = _manifest(storage, join(bucket, "in"), changed)
        argv = [
            "segment", "--task", "salient", "--manifest", manifest, "--model-dir", str(salient_dir),
            "--out", out, "--table", name, "--catalog", iceberg_catalog.name,
            "--reuse", f"iceberg:{name}", "--s3-endpoint", s3_server.endpoint,
            "--report-samples", "0", "--summary-json", str(tmp_path / summary), *more,
        ]  # fmt: skip
        assert main(argv) == 0
        return json.loads((tmp_path / summary).read_text())

    first = night(set(), "n1.json")
    assert first["table"]["table"] == name and first["table"]["rows"] == IMAGES
    before = {r["image_id"]: r for r in read_current(target).to_pylist()}
    changed = {3, 11}  # a tenth of the catalog
    second = night(changed, "n2.json")
    assert second["reused_rows"] == IMAGES - len(changed)  # unchanged images: not inferred again
    now = read_current(target).to_pylist()
    assert sorted(r["image_id"] for r in now) == [f"p{i:02d}" for i in range(IMAGES)]
    for r in now:  # the changed rows from the second night, the others from the first
        then = before[r["image_id"]]
        if int(r["image_id"][1:]) in changed:
            assert r["source_fingerprint"] != then["source_fingerprint"]
            assert r["processed_at"] > then["processed_at"]
        else:
            assert r["processed_at"] == then["processed_at"] and r["mask_uri"] == then["mask_uri"]
        assert storage.exists(r["mask_uri"])  # every row's product is there
    snapshots = _snapshots(target)
    assert [s.summary[RUN_ID] for s in snapshots] == [first["run_id"], second["run_id"]]
    assert snapshots[-1].summary["vbatch.model-version"] and snapshots[-1].summary[
        "vbatch.rows"
    ] == str(IMAGES)
    # time travel: the first snapshot holds the first night's rows, their masks still there
    old = {
        r["image_id"]: r
        for r in read_current(target, snapshot_id=snapshots[0].snapshot_id).to_pylist()
    }
    assert {k: v["processed_at"] for k, v in old.items()} == {
        k: v["processed_at"] for k, v in before.items()
    }
    assert all(storage.exists(r["mask_uri"]) for r in old.values())

    # a run that fails before its commit adds no snapshot
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(FAULT_ENV, "publish:after-stage")
        argv = [
            "segment", "--task", "salient", "--manifest", join(bucket, "in", "manifest.parquet"),
            "--model-dir", str(salient_dir), "--out", out, "--table", name,
            "--catalog", iceberg_catalog.name, "--s3-endpoint", s3_server.endpoint,
            "--report-samples", "0",
        ]  # fmt: skip
        assert main(argv) == 1
    assert len(_snapshots(target)) == 2


def test_a_table_that_cannot_take_the_results_refuses_before_any_work(
    ray_session, s3_server, iceberg_catalog, salient_dir: Path, capsys
) -> None:
    from vbatch.operators.lakehouse import commit

    storage, bucket = s3_server.storage(), s3_server.new_bucket()
    name = "nightly.clash"
    # a table whose foreground_ratio is a string: not a column our float can be written to
    commit(
        IcebergTarget(name, iceberg_catalog.name),
        pa.table({"image_id": ["x"], "foreground_ratio": ["high"]}),
        key=["image_id"],
        schema=pa.schema([("image_id", pa.string()), ("foreground_ratio", pa.string())]),
        run_id="elsewhere",
    )
    manifest = _manifest(storage, join(bucket, "in"), set())
    out = join(bucket, "out")
    argv = [
        "segment", "--task", "salient", "--manifest", manifest, "--model-dir", str(salient_dir),
        "--out", out, "--table", name, "--catalog", iceberg_catalog.name,
        "--s3-endpoint", s3_server.endpoint, "--report-samples", "0",
    ]  # fmt: skip
    assert main(argv) == 1
    assert "foreground_ratio" in capsys.readouterr().err
    # nothing staged, nothing written, the lease released
    assert not storage.list_files(out, ".parquet") and not storage.list_files(out, ".png")
    assert not storage.exists(join(out, "_LATEST")) and not storage.exists(join(out, "_LEASE"))


def test_reid_embed_and_video_commit_their_rows(
    ray_session, s3_server, iceberg_catalog, reid_dir: Path, rvos_dir: Path, tmp_path: Path
) -> None:
    from tests.test_video_job import synthetic_video

    storage, bucket = s3_server.storage(), s3_server.new_bucket()
    manifest = _manifest(
        storage, join(bucket, "people"), set(), make=lambda i, _s: person_crop(i, i % 4)
    )
    common = [
        "--catalog",
        iceberg_catalog.name,
        "--s3-endpoint",
        s3_server.endpoint,
        "--report-samples",
        "0",
    ]
    for _night in (1, 2):
        argv = ["reid", "embed", "--manifest", manifest, "--model-dir", str(reid_dir),
                "--out", join(bucket, "emb"), "--table", "people.embeddings", *common]  # fmt: skip
        assert main(argv) == 0
    target = IcebergTarget("people.embeddings", iceberg_catalog.name)
    rows = read_current(target)
    assert rows.num_rows == IMAGES and len(set(rows.column("image_id").to_pylist())) == IMAGES
    assert len(_snapshots(target)) == 2

    video = synthetic_video(tmp_path / "clip.mp4", 20, seed=3)
    storage.write_bytes(join(bucket, "v", "clip.mp4"), video.read_bytes())
    table = pa.table(
        {"video_id": ["clip"], "uri": ["clip.mp4"], "queries": [["a ball", "the box"]]}
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(join(bucket, "v", "manifest.parquet"), buf.getvalue())
    for _night in (1, 2):
        argv = ["video", "--manifest", join(bucket, "v", "manifest.parquet"), "--model-dir", str(rvos_dir),
                "--out", join(bucket, "video"), "--table", "clips.masks", *common]  # fmt: skip
        assert main(argv) == 0
    target = IcebergTarget("clips.masks", iceberg_catalog.name)
    rows = read_current(target).to_pylist()
    keys = [(r["video_id"], r["query_index"], r["frame_index"]) for r in rows]
    assert len(keys) == len(set(keys)) == 2 * 20  # one row per (video, query, frame)
    assert len(_snapshots(target)) == 2
