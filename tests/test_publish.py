"""Publishing a results table: crash at every step, locally and on the S3 server, and check that a
reader always sees one complete table and that the rerun leaves exactly the new one.

The "job" here stages a small Parquet table the way Ray does (part files under
``<out>/.staging/<run id>/``) and then runs the real publish steps; the real jobs are crashed the
same way in ``test_segment_job.py``.
"""

from __future__ import annotations

import io
import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vbatch.jobs.publish import (
    FAULT_ENV,
    POINTER,
    PUBLISH_STEPS,
    SUCCESS,
    InjectedFault,
    publish,
    read_table,
    results_files,
    staged_files,
    write_run_record,
)
from vbatch.jobs.summary import RunClock
from vbatch.operators.storage import Storage, join

#: the steps after which the new table is the committed one
AFTER_COMMIT = {"after-pointer", "after-cleanup", "after-record"}


def _write_parquet(storage: Storage, uri: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue())


def _job(storage: Storage, out: str, tag: str, rows: int) -> str:
    """Stage ``rows`` rows in two part files, publish them, record the run; returns the run id."""
    run_id = RunClock().run_id
    ids = [f"{tag}-{i}" for i in range(rows)]
    half = rows // 2
    for part, chunk in enumerate((ids[:half], ids[half:])):
        _write_parquet(
            storage,
            join(out, ".staging", run_id, f"part-{part}.parquet"),
            pa.table({"image_id": chunk, "status": ["ok"] * len(chunk)}),
        )
    staged = staged_files(out, storage, run_id)
    publish(out, storage, run_id, staged, rows)
    write_run_record(out, storage, {"run_id": run_id, "rows": rows})
    return run_id


def _ids(storage: Storage, uri: str) -> list[str]:
    return sorted(read_table(uri, storage).column("image_id").to_pylist())


def _check_one_complete_table(storage: Storage, out: str, tag: str, rows: int) -> None:
    expected = sorted(f"{tag}-{i}" for i in range(rows))
    assert _ids(storage, out) == expected
    assert _ids(storage, join(out, "results")) == expected  # same rule from either folder


def _store(request: pytest.FixtureRequest, where: str, tmp_path) -> tuple[Storage, str]:
    if where == "local":
        return Storage(), str(tmp_path)
    server = request.getfixturevalue("s3_server")
    return server.storage(), server.new_bucket()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_crash_at_each_publish_step_keeps_one_complete_table(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path, where: str
) -> None:
    storage, root = _store(request, where, tmp_path)
    for step in PUBLISH_STEPS:
        out = join(root, step)
        _job(storage, out, "old", 3)
        monkeypatch.setenv(FAULT_ENV, f"publish:{step}")
        with pytest.raises(InjectedFault, match=step):
            _job(storage, out, "new", 5)
        monkeypatch.delenv(FAULT_ENV)
        # one complete table: the previous one until the pointer moved, the new one after
        if step in AFTER_COMMIT:
            _check_one_complete_table(storage, out, "new", 5)
        else:
            _check_one_complete_table(storage, out, "old", 3)
        # the run marker: absent from the moment a run starts to publish until it finished
        assert storage.exists(join(out, SUCCESS)) == (step == "after-stage")

        run_id = _job(storage, out, "rerun", 4)
        _check_one_complete_table(storage, out, "rerun", 4)
        # the rerun removed the stale staging and every other generation
        # (files only: the S3 test server keeps empty folders around as objects)
        assert not storage.list_files(join(out, ".staging"), suffix=".parquet")
        remaining = [
            f for f in storage.list_files(join(out, "results")) if f.endswith((".parquet", SUCCESS))
        ]
        assert {f.rsplit("/", 2)[-2] for f in remaining} == {run_id}, remaining
        assert len(remaining) == 3  # two parts and the generation's _SUCCESS
        assert json.loads(storage.read_bytes(join(out, SUCCESS)))["run_id"] == run_id
        assert storage.read_bytes(join(out, POINTER)).decode().strip() == f"results/{run_id}"


def test_pandas_reads_the_committed_table(tmp_path) -> None:
    """What the README tells readers to do works."""
    storage, out = Storage(), str(tmp_path / "out")
    _job(storage, out, "a", 3)
    _job(storage, out, "b", 4)
    generation = (tmp_path / "out" / POINTER).read_text().strip()
    assert len(pd.read_parquet(tmp_path / "out" / generation)) == 4
    # in the steady state the folder itself holds only the committed generation
    assert sorted(pd.read_parquet(tmp_path / "out" / "results")["image_id"]) == [
        f"b-{i}" for i in range(4)
    ]


def test_listing_rule_for_folders_without_a_pointer(tmp_path) -> None:
    storage = Storage()
    legacy = str(tmp_path / "legacy")  # results/*.parquet of the layout before generations
    _write_parquet(storage, join(legacy, "results", "a.parquet"), pa.table({"image_id": ["x"]}))
    _write_parquet(
        storage, join(legacy, ".staging", "r1", "b.parquet"), pa.table({"image_id": ["stale"]})
    )
    assert _ids(storage, legacy) == ["x"] and _ids(storage, join(legacy, "results")) == ["x"]

    # a first run that crashed after copying its generation: no committed table yet
    crashed = str(tmp_path / "crashed")
    _write_parquet(
        storage,
        join(crashed, "results", "20261129T221500Z-0a1b2c", "p.parquet"),
        pa.table({"image_id": ["y"]}),
    )
    assert results_files(crashed, storage) == []
    with pytest.raises(FileNotFoundError, match="no Parquet files"):
        read_table(crashed, storage)

    # a plain folder of Parquet files (e.g. Spark's, with its own _SUCCESS) and a single file
    plain = str(tmp_path / "plain")
    _write_parquet(storage, join(plain, "part-0.parquet"), pa.table({"image_id": ["z"]}))
    storage.write_bytes(join(plain, "_SUCCESS"), b"")
    assert _ids(storage, plain) == ["z"]
    assert _ids(storage, join(plain, "part-0.parquet")) == ["z"]


def test_publish_replaces_a_legacy_table_in_one_step(tmp_path) -> None:
    storage, out = Storage(), str(tmp_path)
    _write_parquet(storage, join(out, "results", "old.parquet"), pa.table({"image_id": ["x"]}))
    run_id = _job(storage, out, "n", 2)
    _check_one_complete_table(storage, out, "n", 2)
    assert not (tmp_path / "results" / "old.parquet").exists()
    assert (tmp_path / "results" / run_id / SUCCESS).exists()


def test_a_folder_named_like_a_parquet_file_is_a_folder(tmp_path) -> None:
    storage = Storage()
    spark = str(tmp_path / "emb.parquet")  # what Spark's df.write.parquet("emb.parquet") makes
    _write_parquet(storage, join(spark, "part-0.parquet"), pa.table({"image_id": ["s"]}))
    storage.write_bytes(join(spark, "_SUCCESS"), b"")
    assert results_files(spark, storage) == [join(spark, "part-0.parquet")]
