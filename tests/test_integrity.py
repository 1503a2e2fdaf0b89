"""What is published is what was computed: every defect of the integrity issue, injected.

A committed row's products belong to its generation (a failed or concurrent run cannot rewrite
them), ``--reuse`` reads the committed generation's own record, one run writes an ``--out`` at a
time, a task Ray retried cannot make publishing fail for ever, and a backfill's ledger compares
run keys. Each test runs locally and on the S3 server.
"""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vbatch.jobs.cli import main
from vbatch.jobs.demo_data import encode, product_image
from vbatch.jobs.lease import LEASE, Holder, Lease, LeaseHeld
from vbatch.jobs.publish import FAULT_ENV, read_table, remove_stale, staged_name
from vbatch.jobs.resume import dedupe_staged
from vbatch.operators.decode import decode_image
from vbatch.operators.storage import Storage, join
from vbatch.operators.tables import POINTER, PRODUCTS, STAGING, commit_record

ROWS = 12


@pytest.fixture(scope="module")
def other_salient_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another salient model (other random weights): model B."""
    from vbatch.models.salient.modeldir import write_random_model_dir

    return write_random_model_dir(tmp_path_factory.mktemp("salient-b"), seed=1, norm_size=(64, 64))


@pytest.fixture(params=["local", "s3"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Storage, str, list[str]]:
    """(storage, a fresh root, the CLI's endpoint arguments) locally or on the S3 server."""
    if request.param == "local":
        return Storage(), str(tmp_path), []
    server = request.getfixturevalue("s3_server")
    return server.storage(), server.new_bucket(), ["--s3-endpoint", server.endpoint]


def _manifest(storage: Storage, root: str, rows: int = ROWS, seed: int = 0) -> str:
    ids, uris = [], []
    for i in range(rows):
        name = f"imgs/{seed}-{i}.jpg"
        storage.write_bytes(join(root, name), encode(product_image(seed * 100 + i, (48, 40))))
        ids.append(f"img-{i:02d}")
        uris.append(name)
    buf = io.BytesIO()
    pq.write_table(pa.table({"image_id": ids, "uri": uris}), buf)
    uri = join(root, f"manifest-{seed}.parquet")
    storage.write_bytes(uri, buf.getvalue())
    return uri


def _segment(model: Path, manifest: str, out: str, endpoint: list[str], *more: str) -> list[str]:
    return [
        "segment", "--task", "salient", "--manifest", manifest, "--model-dir", str(model),
        "--out", out, "--batch-size", "4", "--report-samples", "0", *endpoint, *more,
    ]  # fmt: skip


def _products(storage: Storage, out: str) -> dict[str, tuple[bytes, float]]:
    """Each committed row's mask bytes and its recorded foreground ratio, by image id."""
    table = read_table(out, storage)
    return {
        r["image_id"]: (storage.read_bytes(r["mask_uri"]), r["foreground_ratio"])
        for r in table.to_pylist()
    }


def _consistent(products: dict[str, tuple[bytes, float]]) -> None:
    """Every row's foreground_ratio describes the mask its mask_uri names."""
    for image_id, (data, ratio) in products.items():
        assert decode_image(data).mean() / 255 == pytest.approx(ratio, abs=1e-3), image_id


def _summary(tmp_path: Path, name: str) -> tuple[list[str], Path]:
    path = tmp_path / f"{name}.json"
    return ["--summary-json", str(path)], path


# -- (1) products inside the commit ----------------------------------------------------------------
def test_a_failed_run_cannot_rewrite_the_committed_products(
    ray_session, where, salient_dir: Path, other_salient_dir: Path, tmp_path: Path
) -> None:
    storage, root, endpoint = where
    manifest = _manifest(storage, root)
    out = join(root, "out")
    # (--reuse from the first night on: the rows record their content fingerprints)
    assert main([*_segment(salient_dir, manifest, out, endpoint), "--reuse", out]) == 0
    committed = _products(storage, out)
    _consistent(committed)
    # model B into the same --out fails after writing every product and staging every row
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(FAULT_ENV, "publish:after-stage")
        assert main(_segment(other_salient_dir, manifest, out, endpoint)) == 1
    assert _products(storage, out) == committed  # byte for byte, and their ratios
    # the failed run's products exist, in its own folder, which the committed rows never name
    folders = {u.split(f"/{PRODUCTS}/")[1].split("/")[0] for u in storage.list_files(out, ".png")}
    assert len(folders) == 2
    # A again with --reuse of itself: the same rows, products still A's
    more, path = _summary(tmp_path, "reuse")
    assert main([*_segment(salient_dir, manifest, out, endpoint), "--reuse", out, *more]) == 0
    assert json.loads(path.read_text())["reused_rows"] == ROWS
    assert _products(storage, out) == committed
    # after that commit, the failed run's folder is gone: nothing references it
    folders = {u.split(f"/{PRODUCTS}/")[1].split("/")[0] for u in storage.list_files(out, ".png")}
    assert len(folders) == 1


# -- (2) reuse reads the committed generation's record ---------------------------------------------
def test_reuse_after_a_crash_past_the_pointer_compares_the_committed_model(
    ray_session, where, salient_dir: Path, other_salient_dir: Path, tmp_path: Path
) -> None:
    storage, root, endpoint = where
    manifest = _manifest(storage, root)
    out = join(root, "out")
    assert main([*_segment(salient_dir, manifest, out, endpoint), "--reuse", out]) == 0
    with pytest.MonkeyPatch.context() as mp:  # B commits, then dies before its run.json
        mp.setenv(FAULT_ENV, "publish:after-pointer")
        assert main([*_segment(other_salient_dir, manifest, out, endpoint), "--reuse", out]) == 1
    assert (
        commit_record(out, storage)["model_identity"].split(":")[0]
        != json.loads(storage.read_bytes(join(out, "run.json")))["model_identity"].split(":")[0]
    )  # run.json still describes A's run
    more, path = _summary(tmp_path, "a-again")
    assert main([*_segment(salient_dir, manifest, out, endpoint), "--reuse", out, *more]) == 0
    record = json.loads(path.read_text())
    assert record["reused_rows"] == 0  # B's rows are not A's
    _consistent(_products(storage, out))


# -- (3) one writer per --out ----------------------------------------------------------------------
def test_a_second_run_on_a_held_out_refuses_and_the_table_stays(
    ray_session, where, salient_dir: Path, tmp_path: Path, capsys
) -> None:
    storage, root, endpoint = where
    manifest = _manifest(storage, root)
    out = join(root, "out")
    assert main(_segment(salient_dir, manifest, out, endpoint)) == 0
    before = read_table(out, storage).sort_by("image_id")
    with Lease(out, storage, "20261207T000000Z-abcdef", "segment"):  # a live run holds it
        more, path = _summary(tmp_path, "refused")
        assert main([*_segment(salient_dir, manifest, out, endpoint), *more]) == 1
        err = capsys.readouterr().err
        assert "20261207T000000Z-abcdef" in err and "--break-lease" in err
        assert json.loads(path.read_text())["status"] == "failed"
        assert read_table(out, storage).sort_by("image_id").equals(before)
        assert not storage.list_files(join(out, STAGING), ".parquet")
        # an operator who knows better takes it over
        assert main([*_segment(salient_dir, manifest, out, endpoint), "--break-lease"]) == 0
    assert not storage.exists(join(out, LEASE))


def test_a_dead_runs_lease_is_taken_over(where) -> None:
    storage, root, _ = where
    out = join(root, "out")
    dead = Holder("20261207T000000Z-dead00", "segment", os.uname().nodename, 2**22 + 7, 0, 0)
    stale = Holder("20261207T000000Z-stale0", "segment", "another-host", 1, 0, time.time() - 3600)
    alive = Holder("20261207T000000Z-alive0", "segment", "another-host", 1, 0, time.time())
    for holder, taken in ((dead, True), (stale, True), (alive, False)):
        storage.write_bytes(join(out, LEASE), json.dumps(holder.__dict__).encode())
        lease = Lease(out, storage, "20261207T000001Z-mine00", "segment")
        if taken:
            with lease:
                assert lease.read().run_id == "20261207T000001Z-mine00"
        else:
            with pytest.raises(LeaseHeld, match="alive0"):
                lease.acquire()
    # two runs racing for a free lease: exactly one creates it
    storage.delete(join(out, LEASE))
    first = Lease(out, storage, "20261207T000002Z-one000", "segment")
    second = Lease(out, storage, "20261207T000002Z-two000", "segment")
    first.acquire()
    with pytest.raises(LeaseHeld):
        second.acquire()
    first.release()


def test_cleanup_never_deletes_the_generation_the_pointer_names(tmp_path: Path) -> None:
    storage = Storage()
    out = str(tmp_path / "out")
    for run in ("20261201T000000Z-aaaaaa", "20261202T000000Z-bbbbbb"):
        storage.write_bytes(join(out, "results", run, "_SUCCESS"), b"{}")
    # another run committed b after this one (a) moved the pointer; a's cleanup keeps b
    storage.write_bytes(join(out, POINTER), b"results/20261202T000000Z-bbbbbb\n")
    remove_stale(out, storage, "20261201T000000Z-aaaaaa", set())
    assert storage.exists(join(out, "results", "20261202T000000Z-bbbbbb", "_SUCCESS"))


# -- (4) a staged file written twice ---------------------------------------------------------------
def _wait_for_free_cpus(ray: Any, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    total = ray.cluster_resources()["CPU"]
    while ray.available_resources().get("CPU", 0) < total:
        assert time.monotonic() < deadline, f"CPUs still held: {ray.available_resources()}"
        time.sleep(0.2)


def test_a_failed_runs_actors_die_with_it(ray_session, salient_dir: Path, tmp_path: Path) -> None:
    """A job that fails while its model actors run (here its write stage raises) frees their CPUs
    as it returns: they used to live on until a garbage collection happened to run, and the next
    job of the same driver (a rerun, the next test) waited for resources forever."""
    storage, root = Storage(), str(tmp_path)
    manifest = _manifest(storage, root, rows=8)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(FAULT_ENV, "rows:4")
        assert main(_segment(salient_dir, manifest, join(root, "out"), [])) == 1
    _wait_for_free_cpus(ray_session)
    assert main(_segment(salient_dir, manifest, join(root, "out"), [])) == 0


def test_rows_staged_twice_are_published_once(
    ray_session, where, salient_dir: Path, tmp_path: Path
) -> None:
    storage, root, endpoint = where
    # 40 rows: the job works through 32-row blocks, staged as two files
    manifest = _manifest(storage, root, rows=40)
    out = join(root, "out")
    # a crash once the rows are staged (a crash in the middle, VBATCH_FAULT=rows:32, could stop
    # the job before the other block's file was written: the blocks finish in any order)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(FAULT_ENV, "publish:after-stage")
        assert main(_segment(salient_dir, manifest, out, endpoint)) == 1
    staged = storage.list_files(join(out, STAGING), ".parquet")
    assert staged
    # a retried task wrote one of those files again, cut differently, under another name
    first = staged[0]
    storage.write_bytes(first.replace(".parquet", "-retried.parquet"), storage.read_bytes(first))
    more, path = _summary(tmp_path, "rerun")
    assert main([*_segment(salient_dir, manifest, out, endpoint), *more]) == 0
    table = read_table(out, storage)
    assert sorted(table.column("image_id").to_pylist()) == [f"img-{i:02d}" for i in range(40)]
    assert json.loads(path.read_text())["rows"] == 40


def test_dedupe_keeps_one_of_each_row_and_key_error_rows_apart(tmp_path: Path) -> None:
    storage = Storage()
    rows = pa.table(
        {
            "image_id": pa.array(["a", "b", None, "a"], pa.string()),
            "error": pa.array(
                [None, None, "manifest row 2: null image_id", "manifest row 3: duplicate image_id"]
            ),
            "error_class": pa.array([None, None, "manifest", "manifest"]),
        }
    )
    for name, table in (("1.parquet", rows), ("2.parquet", rows.slice(1, 3))):
        pq.write_table(table, tmp_path / name)
    files, dropped = dedupe_staged(
        [str(tmp_path / "2.parquet"), str(tmp_path / "1.parquet")], storage
    )
    assert (files, dropped) == ([str(tmp_path / "1.parquet")], 3)
    # the same rows give the same staged name, whatever their order
    assert staged_name(rows) == staged_name(rows.take([3, 2, 1, 0])) != staged_name(rows.slice(1))


# -- (5, 6) the backfill's ledger and its partitions' summaries ------------------------------------
def test_backfill_reruns_a_regenerated_partition_and_writes_its_summary(
    ray_session, where, salient_dir: Path, tmp_path: Path
) -> None:
    storage, root, endpoint = where
    # manifests and images in one folder (relative uris resolve against it)
    first = storage.read_bytes(_manifest(storage, join(root, "m"), rows=4, seed=0))
    for day in ("2026-10-01", "2026-10-02"):
        storage.write_bytes(join(root, "m", f"{day}.parquet"), first)
    summary_dir = tmp_path / "summaries"
    job = [
        *_segment(salient_dir, join(root, "m", "{date}.parquet"), join(root, "o", "{date}"), endpoint),
        "--summary-json", str(summary_dir / "{date}.json"),
    ]  # fmt: skip
    argv = ["backfill", "--dates", "2026-10-01..2026-10-02", "--summary-json", "-", "--", *job]
    assert main(argv) == 0
    for day in ("2026-10-01", "2026-10-02"):  # (6) each partition's own summary
        assert json.loads((summary_dir / f"{day}.json").read_text())["rows"] == 4
    # the manifest of the 2nd is regenerated at the same path with other rows
    regenerated = _manifest(storage, join(root, "m"), rows=6, seed=5)
    storage.write_bytes(join(root, "m", "2026-10-02.parquet"), storage.read_bytes(regenerated))
    (summary_dir / "2026-10-02.json").unlink()
    assert main(argv) == 0
    assert read_table(join(root, "o", "2026-10-02"), storage).num_rows == 6  # (5) it ran again
    assert json.loads((summary_dir / "2026-10-02.json").read_text())["rows"] == 6
    # the unchanged partition was skipped, its summary not rewritten by a run
    assert read_table(join(root, "o", "2026-10-01"), storage).num_rows == 4


def test_backfill_staged_files_are_named_by_their_rows(tmp_path: Path) -> None:
    """A retried backfill write task rewrites its own file instead of adding a copy."""
    from vbatch.jobs.publish import PARTITION, _write_staged

    storage = Storage()
    rows = pa.table(
        {
            "image_id": ["a", "b"],
            "error": pa.array([None, None], pa.string()),
            PARTITION: pa.array([0, 0], pa.int32()),
        }
    )
    targets = {0: (str(tmp_path / "out"), "run-k")}
    for _ in range(2):  # the first attempt and its retry
        _write_staged(rows, targets=targets, storage=storage)
    files = storage.list_files(join(str(tmp_path / "out"), STAGING, "run-k"), ".parquet")
    assert len(files) == 1
    assert np.array_equal(pq.read_table(files[0]).column("image_id"), ["a", "b"])


# -- (7) resume keys on content --------------------------------------------------------------------
def test_resume_from_an_s3_model_dir_downloaded_again_keeps_the_work(
    ray_session, s3_server, salient_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retry on a fresh node (a new pod: an empty model cache) resumes: the run key hashes the
    model's content, not the cache's modification times."""
    from tests.test_row_jobs import _kill_when_staged

    storage, bucket = s3_server.storage(), s3_server.new_bucket()
    model = join(bucket, "models", "salient")
    for f in salient_dir.iterdir():
        storage.put_file(f, join(model, f.name))
    # 40 rows: the job works through 32-row blocks, the first is staged before the second blocks
    manifest = _manifest(storage, join(bucket, "in"), rows=40)
    out = join(bucket, "out")
    argv = [
        "segment", "--task", "salient", "--manifest", manifest, "--model-dir", model, "--out", out,
        "--batch-size", "2", "--report-samples", "0", "--s3-endpoint", s3_server.endpoint,
    ]  # fmt: skip
    monkeypatch.setenv("VBATCH_CACHE", str(tmp_path / "first-node"))
    staged = _kill_when_staged(storage, argv, out, "hang:32", min_rows=32)
    monkeypatch.setenv("VBATCH_CACHE", str(tmp_path / "fresh-node"))  # downloaded again
    more, path = _summary(tmp_path, "retry")
    assert main([*argv, *more]) == 0
    record = json.loads(path.read_text())
    assert record["resumed_rows"] == len(staged) >= 0.6 * 40
    assert read_table(out, storage).num_rows == 40
    assert (tmp_path / "fresh-node").is_dir()  # the retry did download the model again
