"""Resume after a crash (``jobs.resume``): the rerun of the same command processes only the rows
the crashed run had not staged, and the published table has every manifest row exactly once.

The crash is injected with ``VBATCH_FAULT=rows:<N>``: the job dies in its write stage at the first
batch holding manifest row N or later, leaving what Ray had staged, as a killed driver would.
Which rows the rerun processed is read from the results themselves: a resumed row keeps the
``processed_at`` of the crashed run.
"""

from __future__ import annotations

import datetime as dt
import gc
import io
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from vbatch.jobs.demo_data import encode, product_image
from vbatch.jobs.publish import FAULT_ENV, read_table
from vbatch.jobs.resume import drop_done, run_key
from vbatch.jobs.segment import ImageJobConfig, run_image_job
from vbatch.operators.manifest import ERROR, ROW, id_hashes
from vbatch.operators.storage import Storage, join
from vbatch.operators.tables import STAGING

NORM_SIZE = (64, 64)
ROWS = 40


@pytest.fixture(scope="module")
def salient_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vbatch.models.salient.modeldir import write_random_model_dir

    return write_random_model_dir(tmp_path_factory.mktemp("salient"), norm_size=NORM_SIZE)


def _write_manifest(storage: Storage, root: str, rows: int = ROWS) -> str:
    """``rows`` images plus a duplicate id and a null id (key-error rows) in the middle."""
    ids: list[str | None] = []
    uris = []
    for i in range(rows):
        storage.write_bytes(join(root, "imgs", f"{i}.jpg"), encode(product_image(i, (40, 32))))
        ids.append(f"img-{i:03d}")
        uris.append(f"imgs/{i}.jpg")
    for extra in ("img-005", None):  # rows `rows` and `rows + 1`: error rows named by their row
        ids.append(extra)
        uris.append("imgs/0.jpg")
    buf = io.BytesIO()
    pq.write_table(pa.table({"image_id": pa.array(ids, pa.string()), "uri": uris}), buf)
    storage.write_bytes(join(root, "manifest.parquet"), buf.getvalue())
    return join(root, "manifest.parquet")


def _wait_for_released_actors(timeout: float = 120) -> None:
    """A failed dataset's actors are killed when its executor is collected; a killed driver loses
    them at once. On the tests' 2-CPU Ray a lingering model actor would starve the rerun."""
    import ray

    gc.collect()
    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources().get("CPU", 0):
        if time.monotonic() > deadline:
            break
        gc.collect()
        time.sleep(0.5)


def _staged_rows(storage: Storage, out: str) -> list[dict]:
    rows: list[dict] = []
    for f in storage.list_files(join(out, STAGING), suffix=".parquet"):
        fs, path = storage.arrow_fs(f)
        rows += pq.read_table(path, filesystem=fs, columns=["image_id", "error"]).to_pylist()
    return rows


def _crash_then_resume(storage: Storage, cfg: ImageJobConfig, crash_row: int) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(FAULT_ENV, f"rows:{crash_row}")
        # Ray wraps the UDF's InjectedFault in its own task error
        with pytest.raises(Exception, match="injected fault at manifest row"):
            run_image_job(cfg)
    _wait_for_released_actors()
    staged = _staged_rows(storage, cfg.out)
    assert 0 < len(staged) < ROWS, "the crashed run staged nothing or everything"
    rerun_start = dt.datetime.now(dt.timezone.utc)
    summary = run_image_job(cfg)
    assert summary.record["resumed_rows"] == len(staged)
    table = read_table(cfg.out, storage)
    # every manifest row exactly once
    assert table.num_rows == ROWS + 2
    ids = table.column("image_id").to_pylist()
    expected = sorted([f"img-{i:03d}" for i in range(ROWS)] + ["img-005"])
    assert sorted(i for i in ids if i is not None) == expected and ids.count(None) == 1
    assert table.filter(pc.equal(table.column("status"), "ok")).num_rows == ROWS
    # the rerun processed exactly the rows the crashed run had not staged
    rows = table.to_pylist()
    redone = [(r["image_id"], r["error"]) for r in rows if r["processed_at"] >= rerun_start]
    kept = [(r["image_id"], r["error"]) for r in rows if r["processed_at"] < rerun_start]
    assert sorted(kept, key=str) == sorted(((r["image_id"], r["error"]) for r in staged), key=str)
    assert len(redone) == ROWS + 2 - len(staged)
    # one mask per ok row, nothing left in staging
    masks = storage.list_files(join(cfg.out, "masks"))
    assert len(masks) == ROWS and all(m.endswith(".png") for m in masks)
    assert not storage.list_files(join(cfg.out, STAGING), suffix=".parquet")


@pytest.mark.skip(
    reason="the crashed dataset's model actor is not released in-process (Ray 2.60): on the tests' "
    "2-CPU shared Ray the rerun's fetch stage then waits for a CPU forever; needs the crash in a "
    "subprocess (bench/bench_resume.py kills a real driver)"
)
@pytest.mark.parametrize("where", ["local", "s3"])
def test_resume_after_crash(
    request: pytest.FixtureRequest, ray_session, tmp_path: Path, salient_dir: Path, where: str
) -> None:
    if where == "local":
        storage, root, endpoint = Storage(), str(tmp_path), None
    else:
        server = request.getfixturevalue("s3_server")
        storage, root, endpoint = server.storage(), server.new_bucket(), server.endpoint
    manifest = _write_manifest(storage, join(root, "in"))
    cfg = ImageJobConfig(
        "salient",
        manifest,
        str(salient_dir),
        join(root, "out"),
        batch_size=4,
        rows_per_block=4,
        s3_endpoint=endpoint,
    )
    _crash_then_resume(storage, cfg, crash_row=ROWS // 2)


def test_drop_done_keeps_rows_not_staged() -> None:
    batch = pa.table(
        {
            "image_id": pa.array(["a", "b", "c", "a", None], pa.string()),
            ROW: pa.array([0, 1, 2, 3, 4], pa.int64()),
            ERROR: pa.array(
                [None, None, None, "manifest row 3: duplicate", "manifest row 4: null"]
            ),
        }
    )
    done_ids = np.sort(id_hashes(pa.array(["a", "c"])))
    kept = drop_done(batch, done_ids, np.array([4], np.int64))
    # "a" and "c" were staged; the duplicate of "a" (row 3) was not, the null id (row 4) was
    assert kept.column(ROW).to_pylist() == [1, 3]
    assert drop_done(batch, np.empty(0, np.uint64), np.empty(0, np.int64)).num_rows == 5


def test_run_key_ignores_pool_settings_only() -> None:
    config = {"task": "salient", "manifest": "m", "batch_size": 4, "actors": 2, "max_side": 2000}
    base = run_key(config, [["m", 10, "t"]], [["w.pt", 5, 1]])
    assert (
        run_key({**config, "batch_size": 8, "actors": 1}, [["m", 10, "t"]], [["w.pt", 5, 1]])
        == base
    )
    assert run_key({**config, "max_side": 1000}, [["m", 10, "t"]], [["w.pt", 5, 1]]) != base
    assert run_key(config, [["m", 11, "t"]], [["w.pt", 5, 1]]) != base  # manifest changed
    assert run_key(config, [["m", 10, "t"]], [["w.pt", 5, 2]]) != base  # weights rewritten
