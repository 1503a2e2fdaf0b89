"""Resume after a crash (``jobs.resume``): the rerun of the same command processes only the rows
the crashed run had not staged, and the published table has every manifest row exactly once.

The job runs as its own process with ``VBATCH_FAULT=hang:<N>``: the batch holding manifest row N
blocks before the write stage, the rows before it are staged, and the test SIGKILLs the driver's
process group (the driver and the Ray it started), as a lost node or a cancelled job would.
Which rows the rerun processed is read from the results themselves: a resumed row keeps the
``processed_at`` of the crashed run.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from vbatch.jobs.cli import main
from vbatch.jobs.config import key_fields
from vbatch.jobs.demo_data import encode, product_image
from vbatch.jobs.publish import FAULT_ENV, read_table
from vbatch.jobs.resume import drop_done, run_key
from vbatch.jobs.segment import ImageJobConfig
from vbatch.operators.manifest import ERROR, ROW, id_hashes
from vbatch.operators.storage import Storage, join
from vbatch.operators.tables import STAGING

ROWS = 64


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


def _staged_rows(storage: Storage, out: str) -> list[dict]:
    """The rows of the readable staged files (a local file being written has no footer yet)."""
    fs, path = storage.fs(join(out, STAGING))
    fs.invalidate_cache(path)
    rows: list[dict] = []
    for f in storage.list_files(join(out, STAGING), suffix=".parquet"):
        afs, apath = storage.arrow_fs(f)
        try:
            rows += pq.read_table(apath, filesystem=afs, columns=["image_id", "error"]).to_pylist()
        except Exception:
            pass
    return rows


def _kill_driver_then_resume(storage: Storage, argv: list[str], out: str, hang_row: int) -> None:
    """Run the job as its own driver process on the tests' Ray, SIGKILL it once rows before
    ``hang_row`` are staged and the rows from it on are blocked, then rerun the same command.

    The driver joins the running Ray (a second Ray instance would cost a start-up on the tests'
    2 cores); Ray releases a dead driver's actors and tasks, as on a real cluster."""
    import ray

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env[FAULT_ENV] = f"hang:{hang_row}"
    address = ray.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "vbatch.jobs.cli", *argv, "--address", address]
    proc = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 600
        while len(_staged_rows(storage, out)) < 8:
            if proc.poll() is not None:
                pytest.fail(f"the job ended (rc {proc.returncode}): {proc.stderr.read()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("the job staged nothing in 10 minutes")
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started, no cleanup
        proc.wait()
    staged = _staged_rows(storage, out)
    assert 0 < len(staged) < ROWS, "the killed run staged nothing or everything"
    rerun_start = dt.datetime.now(dt.timezone.utc)
    summary = tempfile.NamedTemporaryFile(suffix=".json", delete=False).name
    assert main([*argv, "--summary-json", summary]) == 0
    assert json.loads(Path(summary).read_text())["resumed_rows"] == len(staged)
    table = read_table(out, storage)
    # every manifest row exactly once
    assert table.num_rows == ROWS + 2
    ids = table.column("image_id").to_pylist()
    expected = sorted([f"img-{i:03d}" for i in range(ROWS)] + ["img-005"])
    assert sorted(i for i in ids if i is not None) == expected and ids.count(None) == 1
    assert table.filter(pc.equal(table.column("status"), "ok")).num_rows == ROWS
    # the rerun processed exactly the rows the killed run had not staged
    rows = table.to_pylist()
    redone = [(r["image_id"], r["error"]) for r in rows if r["processed_at"] >= rerun_start]
    kept = [(r["image_id"], r["error"]) for r in rows if r["processed_at"] < rerun_start]
    assert sorted(kept, key=str) == sorted(((r["image_id"], r["error"]) for r in staged), key=str)
    assert len(redone) == ROWS + 2 - len(staged)
    # one mask per ok row, nothing left in staging
    # the crashed attempt's masks (of the rows it staged) and the rerun's, in their own folders
    masks = storage.list_files(join(out, "products"))
    assert len(masks) == ROWS and all(m.endswith(".png") for m in masks)
    assert not storage.list_files(join(out, STAGING), suffix=".parquet")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_resume_after_killed_driver(
    request: pytest.FixtureRequest, ray_session, tmp_path: Path, salient_dir: Path, where: str
) -> None:
    if where == "local":
        storage, root, endpoint = Storage(), str(tmp_path), []
    else:
        server = request.getfixturevalue("s3_server")
        storage, root = server.storage(), server.new_bucket()
        endpoint = ["--s3-endpoint", server.endpoint]
    manifest = _write_manifest(storage, join(root, "in"))
    out = join(root, "out")
    argv = [
        "segment", "--task", "salient", "--manifest", manifest, "--model-dir", str(salient_dir),
        "--out", out, "--batch-size", "4", "--actors", "1", *endpoint,
        "--max-error-rate", "0.1",  # the two key-error rows
    ]  # fmt: skip
    # the job works through 32-row blocks (its default rows per block): the first is staged, the
    # second blocks before its write stage
    _kill_driver_then_resume(storage, argv, out, hang_row=32)


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
    config = ImageJobConfig("salient", "m", "d", "o", batch_size=4, actors=2)

    def key(cfg: ImageJobConfig, manifest: int = 10, model: str = "v1:aa") -> str:
        return run_key(key_fields(cfg), [["m", manifest, "t"]], [model])

    base = key(config)
    assert key(dataclasses.replace(config, batch_size=8, actors=1)) == base
    # placement and locations decide no row either: a retry with them added still resumes
    moved = dataclasses.replace(
        config, forward_s3_env=True, actor_resources={"gpu": 1}, model_dir="s3://b/d", out="x"
    )
    assert key(moved) == base
    assert key(dataclasses.replace(config, max_side=1000)) != base
    assert key(config, manifest=11) != base  # manifest changed
    assert key(config, model="v2:aa") != base  # weights rewritten


def test_every_config_field_has_a_role() -> None:
    """The run key, --reuse and the backfill pool derive from each field's role: a field
    without one fails here (and when its class is used)."""
    from vbatch.jobs.config import RESULT, check_roles, role
    from vbatch.jobs.reid_search import SearchJobConfig
    from vbatch.jobs.video import VideoConfig

    for cls in (ImageJobConfig, VideoConfig, SearchJobConfig):
        check_roles(cls)

    @dataclasses.dataclass(frozen=True)
    class Grown(ImageJobConfig):
        new_option: int = 3
        decided: int = role(RESULT, 1)

    with pytest.raises(TypeError, match="new_option"):
        check_roles(Grown)
