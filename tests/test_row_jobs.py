"""The row-job contract, one parametrised test over every row job and both stores.

Every row job (``segment`` for each image task, ``reid embed``, ``reid search --manifest``,
``video``) promises the same, and this test holds each to it, locally and on the S3 server:

1. **a killed driver**: the job runs as its own driver process, blocks in its write stage once some
   rows are staged (``VBATCH_FAULT=hang:…``) and is SIGKILLed with the Ray it started, as a lost
   node or a cancelled job would leave it; the same command again finishes the job, and the jobs
   that resume (the image jobs, video) take over exactly the rows the killed run had staged;
2. **every manifest row exactly once**, in the job's own unit (one row per image; ``k`` hits or
   one error row per query; rows per (video, query, frame), none twice, every video present);
3. **exit codes and the summary JSON**: 3 when more rows failed than ``--max-error-rate`` (the
   inputs hold broken rows), 0 with a limit that fits them, 1 when the job fails as a whole (a
   manifest without a required column), with the summary's status, counts and run id;
4. **a rerun replaces** the table: one generation, a new run id, no staged or orphaned files, the
   products of the committed rows only; a failed run leaves that table as it was.

It replaces the killed-driver, rerun and exit-code scenarios that were written once per job. Every
job runs it locally; on S3, one job of each pipeline (:data:`CASES`).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from vbatch.jobs.cli import main
from vbatch.jobs.demo_data import encode, person_crop, product_image
from vbatch.jobs.lease import LEASE
from vbatch.jobs.publish import FAULT_ENV, read_table
from vbatch.operators.storage import Storage, join
from vbatch.operators.tables import POINTER, PRODUCTS, STAGING, commit_record
from vbatch.schemas.images import PRODUCT_URI_COLUMNS

#: good images of an image manifest; four broken rows follow. The job works through 32-row blocks
#: (its CPU stages' batch, which the model stage's output keeps): ``hang:32`` lets the first block
#: be staged and blocks the second
GOOD = 36


# -- the inputs of each job ------------------------------------------------------------------------
def _write_table(storage: Storage, uri: str, table: pa.Table) -> str:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue())
    return uri


def _images(storage: Storage, root: str, make: Callable[[int], np.ndarray]) -> str:
    """GOOD images, a corrupt file and a missing one."""
    ids, uris = [], []
    for i in range(GOOD):
        storage.write_bytes(join(root, "imgs", f"{i}.jpg"), encode(make(i)))
        ids.append(f"img-{i}")
        uris.append(f"imgs/{i}.jpg")
    storage.write_bytes(join(root, "imgs", "corrupt.jpg"), b"\xff\xd8 not a jpeg")
    ids += ["corrupt", "missing"]
    uris += ["imgs/corrupt.jpg", "imgs/missing.jpg"]
    return _write_table(
        storage, join(root, "manifest.parquet"), pa.table({"image_id": ids, "uri": uris})
    )


def _products(storage: Storage, root: str) -> str:
    return _images(storage, root, lambda i: product_image(i, (56, 40)))


def _people(storage: Storage, root: str) -> str:
    return _images(storage, root, lambda i: person_crop(i, i % 3))


def _videos(storage: Storage, root: str) -> str:
    """A three-window video with two queries, a one-window one, a corrupt file and a missing one
    (their error rows, a row per query, are over 1 % of the frames' rows)."""
    from tests.test_video_job import synthetic_video

    tmp = Path(tempfile.mkdtemp(prefix="vbatch-videos-"))
    for name, frames, seed in (("long.mp4", 60, 1), ("short.mp4", 20, 2)):
        path = synthetic_video(tmp / name, frames, seed=seed)
        storage.write_bytes(join(root, name), path.read_bytes())
    storage.write_bytes(join(root, "corrupt.mp4"), b"\x00\x00\x00\x18ftypmp42 not a video")
    two = ["a red ball", "the box"]
    table = pa.table(
        {
            "video_id": ["long", "short", "corrupt", "gone"],
            "uri": ["long.mp4", "short.mp4", "corrupt.mp4", "gone.mp4"],
            "queries": [two, ["a red ball"], two, two],
        }
    )
    return _write_table(storage, join(root, "videos.parquet"), table)


# -- how each job counts its rows ------------------------------------------------------------------
def _once_per_image(table: pa.Table, manifest: pa.Table) -> tuple[int, int]:
    ids = table.column("image_id").to_pylist()
    assert sorted(ids, key=str) == sorted(manifest.column("image_id").to_pylist(), key=str)
    assert len({_image_key(r) for r in table.to_pylist()}) == table.num_rows
    errors = table.filter(pc.not_equal(table.column("status"), "ok")).num_rows
    return len(ids), errors


def _image_key(row: dict) -> tuple:
    """An image row's key: its id, or for an unusable key the error naming its manifest row."""
    return (row["image_id"], row["error"] if row["error_class"] == "manifest" else None)


def _frame_key(row: dict) -> tuple:
    return (row["manifest_row"], row["query_index"], row["frame_index"])


def _once_per_query(table: pa.Table, manifest: pa.Table) -> tuple[int, int]:
    by_query: dict[str, list[dict]] = {}
    for r in table.to_pylist():
        by_query.setdefault(r["query_id"], []).append(r)
    assert sorted(by_query) == sorted(manifest.column("image_id").to_pylist())
    errors = 0
    for rows in by_query.values():
        if rows[0]["status"] != "ok":
            assert len(rows) == 1  # one error row per failed query
            errors += 1
        else:
            assert sorted(r["rank"] for r in rows) == list(range(1, len(rows) + 1))
    return len(by_query), errors


def _once_per_frame(table: pa.Table, manifest: pa.Table) -> tuple[int, int]:
    rows = table.to_pylist()
    assert {r["manifest_row"] for r in rows} == set(range(manifest.num_rows))
    keys = [(r["manifest_row"], r["query_index"], r["frame_index"]) for r in rows]
    assert len(keys) == len(set(keys))  # no (video, query, frame) twice
    return len(rows), sum(r["status"] != "ok" for r in rows)


@dataclass(frozen=True)
class RowJob:
    name: str
    #: the command line up to its inputs (the model directory comes from ``model``)
    command: tuple[str, ...]
    #: the session fixture of its model directory
    model: str
    inputs: Callable[[Storage, str], str]
    once: Callable[[pa.Table, pa.Table], tuple[int, int]]
    #: ``VBATCH_FAULT`` that blocks its write stage once some rows are staged
    hang: str
    #: whether a rerun takes over what a killed run staged (``resumed_rows``)
    resumes: bool = True
    #: the summary's ``rows`` is the table's rows (else the units: queries)
    rows_are_units: bool = True
    #: the column a manifest must have (dropped to make the job fail as a whole)
    required: str = "uri"
    #: a result row's key (resumable jobs: which rows the killed run had staged)
    key: Callable[[dict], tuple] = _image_key
    #: ``--batch-size``: video's is windows per model call, one so that the first window's block
    #: holds nothing the fault blocks
    batch: str = "2"


JOBS = [
    RowJob("segment-salient", ("segment", "--task", "salient"), "salient_dir", _products, _once_per_image, "hang:32"),
    RowJob("segment-shop-seg", ("segment", "--task", "shop-seg"), "shop_seg_dir", _products, _once_per_image, "hang:32"),
    RowJob("segment-matting", ("segment", "--task", "matting"), "matting_dir", _products, _once_per_image, "hang:32"),
    RowJob("reid-embed", ("reid", "embed"), "reid_dir", _people, _once_per_image, "hang:32"),
    RowJob("reid-search", ("reid", "search", "--k", "3"), "reid_dir", _people, _once_per_query, "hang:32", resumes=False, rows_are_units=False),
    RowJob("video", ("video",), "rvos_dir", _videos, _once_per_frame, "hang:0:1", required="queries", key=_frame_key, batch="1"),
]  # fmt: skip


@pytest.fixture(scope="session")
def gallery(tmp_path_factory: pytest.TempPathFactory, reid_dir: Path) -> str:
    """A small gallery index of the reid model's version (the search job refuses others)."""
    from vbatch.models import model_version
    from vbatch.models.reid import TINY
    from vbatch.operators.index import build_index

    root = tmp_path_factory.mktemp("gallery")
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(20, TINY.embed_dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    table = pa.table(
        {
            "image_id": [f"g{i}" for i in range(20)],
            "status": ["ok"] * 20,
            "embedding": pa.array(list(vectors), pa.list_(pa.float32(), TINY.embed_dim)),
            "model_version": [model_version("reid", reid_dir)] * 20,
        }
    )
    pq.write_table(table, root / "embeddings.parquet")
    build_index(str(root / "embeddings.parquet"), str(root / "index"), Storage())
    return str(root / "index")


def _argv(
    job: RowJob, model: Path, manifest: str, out: str, endpoint: list[str], index: str
) -> list[str]:
    extra = ["--index", index] if job.name == "reid-search" else []
    return [
        *job.command, *extra, "--manifest", manifest, "--model-dir", str(model), "--out", out,
        "--batch-size", job.batch, "--report-samples", "0", *endpoint,
    ]  # fmt: skip


def _staged_rows(storage: Storage, out: str) -> list[dict]:
    """The rows of the readable staged files (a local file being written has no footer yet)."""
    fs, path = storage.fs(join(out, STAGING))
    fs.invalidate_cache(path)
    rows: list[dict] = []
    for f in storage.list_files(join(out, STAGING), suffix=".parquet"):
        afs, apath = storage.arrow_fs(f)
        try:
            rows += pq.read_table(apath, filesystem=afs).to_pylist()
        except Exception:
            pass
    return rows


def _kill_when_staged(
    storage: Storage,
    argv: list[str],
    out: str,
    fault: str,
    staged: bool = True,
    min_rows: int = 1,
) -> list[dict]:
    """Run ``argv`` as its own driver on the tests' Ray, SIGKILL its process group once rows are
    staged (``min_rows``) and the rest are blocked by ``fault`` (``staged=False``: once it holds
    ``--out``'s lease and blocks); returns the rows staged at the kill."""
    import ray

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env[FAULT_ENV] = fault
    address = ray.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "vbatch.jobs.cli", *argv, "--address", address]
    proc = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 600
        while not (
            len(_staged_rows(storage, out)) >= min_rows
            if staged
            else storage.exists(join(out, LEASE))
        ):
            if proc.poll() is not None:
                pytest.fail(f"the job ended (rc {proc.returncode}): {proc.stderr.read()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("the job staged nothing in 10 minutes")
            time.sleep(0.5)
        time.sleep(1)  # a file written just before the block lands
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started, no cleanup
        proc.wait()
    return _staged_rows(storage, out)


def _run(argv: list[str], summary: Path, *more: str) -> tuple[int, dict[str, Any]]:
    code = main([*argv, *more, "--summary-json", str(summary)])
    return code, json.loads(summary.read_text())


def _generation(storage: Storage, out: str) -> str:
    return storage.read_bytes(join(out, POINTER)).decode().strip()


def _results(job: RowJob, table: pa.Table, storage: Storage) -> list[tuple[dict, list]]:
    """The rows in key order, each with its products' pixels (read now: a later commit removes
    the products no committed row names)."""
    from vbatch.operators.decode import decode_image

    rows = sorted(table.to_pylist(), key=lambda r: repr(job.key(r)))
    return [
        (
            r,
            [
                decode_image(storage.read_bytes(r[c])) if r.get(c) else None
                for c in PRODUCT_URI_COLUMNS
            ],
        )
        for r in rows
    ]


def _same_results(job: RowJob, a: list[tuple[dict, list]], b: list[tuple[dict, list]]) -> None:
    """Two runs of the same inputs gave the same rows (:func:`_results`): equal but for when they
    were computed and where their products were written; floats and product pixels within what
    another batch composition moves (1e-5; one grey level)."""
    assert len(a) == len(b)
    for (x, xp), (y, yp) in zip(a, b, strict=True):
        for name in x:
            if name == "processed_at" or name in PRODUCT_URI_COLUMNS:
                continue
            if isinstance(x[name], (float, list)):
                np.testing.assert_allclose(x[name], y[name], atol=1e-5, err_msg=name)
            else:
                assert x[name] == y[name], (name, job.key(x))
        for u, v in zip(xp, yp, strict=True):
            assert (u is None) == (v is None), job.key(x)
            if u is not None:
                assert np.abs(u.astype(np.int16) - v.astype(np.int16)).max() <= 1, job.key(x)


def _kept_and_redone(
    job: RowJob, staged: list[dict], table: pa.Table, run_id: str, rerun_start: float
) -> None:
    """The killed run's staged rows are published as they were (not computed again); every other
    row is the rerun's (computed after it started, its products in the rerun's folder)."""
    kept = {job.key(r): r for r in staged}
    mine = f"/{PRODUCTS}/{run_id}/"
    for row in table.to_pylist():
        product = row.get("mask_uri") or row.get("matte_uri")
        if job.key(row) in kept:
            assert row == kept[job.key(row)]
            assert product is None or mine not in product
        elif "processed_at" in row:
            assert row["processed_at"].timestamp() >= rerun_start - 1
        if job.key(row) not in kept and product is not None:
            assert mine in product


#: every job locally; on S3, one job of each pipeline (the image pipeline with its products, the
#: search, video): the store's part of the contract (staging, listing, the commit, the products'
#: folders) is the pipeline's, not the model's, and each case costs a minute on the 2-core machine
CASES = [(job, "local") for job in JOBS] + [
    (job, "s3") for job in JOBS if job.name in ("segment-salient", "reid-search", "video")
]


@pytest.mark.parametrize(
    ("job", "where"), CASES, ids=[f"{job.name}-{where}" for job, where in CASES]
)
def test_row_job_contract(
    request: pytest.FixtureRequest, ray_session, tmp_path: Path, job: RowJob, where: str
) -> None:
    if where == "local":
        storage, root, endpoint = Storage(), str(tmp_path), []
    else:
        server = request.getfixturevalue("s3_server")
        storage, root = server.storage(), server.new_bucket()
        endpoint = ["--s3-endpoint", server.endpoint]
    model = request.getfixturevalue(job.model)
    index = request.getfixturevalue("gallery") if job.name == "reid-search" else ""
    manifest_uri = job.inputs(storage, join(root, "in"))
    afs, apath = storage.arrow_fs(manifest_uri)
    manifest = pq.read_table(apath, filesystem=afs)
    out = join(root, "out")
    argv = _argv(job, model, manifest_uri, out, endpoint, index)

    # 1. a killed driver, then the same command: finished, every row once
    # (the search actors batch their queries: nothing is staged before all are embedded, so the
    # search job is killed while it blocks in its embedding stage)
    staged = _kill_when_staged(storage, argv, out, job.hang, staged=job.resumes)
    rerun_start = time.time()
    code, record = _run(argv, tmp_path / "resumed.json")
    table = read_table(out, storage)
    units, errors = job.once(table, manifest)  # 2. every manifest row exactly once
    assert errors > 0 and errors < units
    # 3. exit 3: the broken inputs are over the default --max-error-rate (1 %)
    assert (code, record["exit_code"], record["status"]) == (3, 3, "too_many_errors")
    assert record["rows"] == (table.num_rows if job.rows_are_units else units)
    assert record["run_id"] and sum(record["by_status"].values()) == record["rows"]
    if job.resumes:  # the rerun took over exactly what the killed run had staged
        assert record["resumed_rows"] == len(staged) > 0
        _kept_and_redone(job, staged, table, record["run_id"], rerun_start)
    first = _generation(storage, out)

    resumed = _results(job, table, storage)
    # 4. a rerun replaces the table; 0 with a limit that fits the broken inputs
    code, again = _run(argv, tmp_path / "again.json", "--max-error-rate", "1")
    assert (code, again["exit_code"], again["status"]) == (0, 0, "ok")
    assert again["run_id"] != record["run_id"] and _generation(storage, out) != first
    table = read_table(out, storage)
    assert job.once(table, manifest) == (units, errors)
    assert not storage.list_files(join(out, STAGING), ".parquet")
    generations = {
        f.split("/results/")[1].split("/")[0] for f in storage.list_files(join(out, "results"))
    }
    assert generations == {again["run_id"]}
    # products: only the committed generation's folders are left
    kept = set((commit_record(out, storage) or {})["product_dirs"])
    products = storage.list_files(join(out, PRODUCTS))
    assert {"/".join(f[len(out) + 1 :].split("/")[:2]) for f in products} == kept
    named = [u for r in table.to_pylist() for c in PRODUCT_URI_COLUMNS if (u := r.get(c))]
    assert sorted(named) == sorted(products)  # one file per product a row names, none else
    # the resumed run's rows are a clean run's (this rerun resumed nothing: it is one)
    _same_results(job, resumed, _results(job, table, storage))

    # 3. exit 1: a manifest without a required column fails the job; the table stays
    bad_uri = join(root, "in", "bad.parquet")
    _write_table(storage, bad_uri, manifest.drop_columns([job.required]))
    bad = [bad_uri if a == manifest_uri else a for a in argv]
    code, failed = _run(bad, tmp_path / "failed.json")
    assert (code, failed["exit_code"], failed["status"]) == (1, 1, "failed")
    assert job.required in failed["error"]
    assert _generation(storage, out) == f"results/{again['run_id']}"
    assert job.once(read_table(out, storage), manifest) == (units, errors)
