"""Results into Iceberg tables (vbatch.operators.lakehouse) on a real catalog: the REST catalog of
the session's SeaweedFS (tests/iceberg_server.py), and pyiceberg's SQL catalog on sqlite.

Run ids, keys and rows are small and made here; every assertion reads the table back through
pyiceberg (and DuckDB where its Iceberg extension is installed)."""

from __future__ import annotations

import glob
import io
import site
import uuid
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("pyiceberg", reason="the iceberg extra is not installed")

from tests.iceberg_server import CATALOG, catalog_env
from vbatch.operators.lakehouse import (
    BUCKETS,
    JOB_KEYS,
    RUN_ID,
    CommitConflictError,
    IcebergError,
    IcebergTarget,
    commit,
    load_catalog,
    prepare,
    read_current,
)
from vbatch.operators.lakehouse import upsert as commit_module
from vbatch.operators.lakehouse.catalog import load_table
from vbatch.schemas.images import image_results_schema, image_row_errors
from vbatch.schemas.videos import VIDEO_RESULTS

SCHEMA = image_results_schema("mask")
IMAGE = JOB_KEYS["segment"]


def image_rows(ids: list[str], run: str, schema: pa.Schema = SCHEMA, **extra: list) -> pa.Table:
    """Result rows of ``ids`` as run ``run`` would write them (its name in the mask URIs)."""
    n = len(ids)
    cols = {
        "image_id": ids,
        "uri": [f"s3://catalog/{i}.jpg" for i in ids],
        "task": ["salient"] * n,
        "status": ["ok"] * n,
        "error": [None] * n,
        "error_class": [None] * n,
        "width": [640] * n,
        "height": [480] * n,
        "model_version": ["m1"] * n,
        "processed_at": [datetime(2026, 11, 30, tzinfo=timezone.utc)] * n,
        "source_fingerprint": [f"etag:{i}" for i in ids],
        "mask_uri": [f"s3://out/{run}/{i}.png" for i in ids],
        "foreground_ratio": [0.25] * n,
        **extra,
    }
    return pa.table(cols, schema=schema)


def stage(s3_server, table: pa.Table, parts: int = 3) -> list[str]:
    """``table`` as ``parts`` staged Parquet files on the S3 server (what a job's run leaves)."""
    storage, bucket = s3_server.storage(), s3_server.new_bucket()
    uris = []
    step = -(-table.num_rows // parts)
    for i in range(parts):
        buf = io.BytesIO()
        pq.write_table(table.slice(i * step, step), buf)
        uris.append(f"{bucket}/.staging/run/part-{i}.parquet")
        storage.write_bytes(uris[-1], buf.getvalue())
    return uris


@pytest.fixture
def target(iceberg_catalog) -> IcebergTarget:
    """A table name of its own in the session's catalog (created by the first commit)."""
    return IcebergTarget(f"vbatch_tests.t_{uuid.uuid4().hex[:10]}", catalog=CATALOG)


def by_id(table: pa.Table) -> dict[str, dict]:
    return {r["image_id"]: r for r in table.to_pylist()}


def snapshots(target: IcebergTarget) -> list:
    return load_catalog(target.catalog).load_table(target.table).snapshots()


def data_files(s3_server, target: IcebergTarget) -> set[str]:
    """The Parquet objects under the table's data folder, referenced or not (a table bucket
    answers a plain listing, not s3fs's HEAD of a folder)."""
    import boto3

    location = load_catalog(target.catalog).load_table(target.table).location()
    bucket, prefix = location.removeprefix("s3://").split("/", 1)
    pages = boto3.client("s3", endpoint_url=s3_server.endpoint).get_paginator("list_objects_v2")
    return {
        f"s3://{bucket}/{obj['Key']}"
        for page in pages.paginate(Bucket=bucket, Prefix=f"{prefix}/data/")
        for obj in page.get("Contents", [])
        if obj["Key"].endswith(".parquet")
    }


def referenced_files(target: IcebergTarget) -> set[str]:
    table = load_catalog(target.catalog).load_table(target.table)
    return {task.file.file_path for task in table.scan().plan_files()}


# -- names and configuration -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["results", "ns.", ".t", "ns.my table", "ns/t.x"])
def test_bad_table_names_are_refused(name):
    with pytest.raises(IcebergError, match=r"NAMESPACE\.TABLE"):
        IcebergTarget(name)


def test_an_unconfigured_catalog_says_how_to_configure_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.pyiceberg.yaml
    monkeypatch.setenv("PYICEBERG_HOME", str(tmp_path))
    with pytest.raises(IcebergError, match=r"PYICEBERG_CATALOG__NIGHTLY__URI.*pyiceberg\.yaml"):
        prepare(IcebergTarget("ns.t", catalog="nightly"), SCHEMA, IMAGE)


def test_sql_catalog_configured_after_pyiceberg_was_imported(tmp_path, monkeypatch):
    """The laptop set-up of docs/ICEBERG.md: pyiceberg's SqlCatalog on sqlite, configured through
    the environment after pyiceberg.catalog read it (at import)."""
    import pyiceberg.catalog  # noqa: F401 (reads PYICEBERG_* now, before the variables exist)

    (tmp_path / "warehouse").mkdir()
    env = catalog_env(
        "laptop",
        {
            "type": "sql",
            "uri": f"sqlite:///{tmp_path}/catalog.db",
            "warehouse": f"file://{tmp_path}/warehouse",
        },
    )
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    target = IcebergTarget("ml.segment", catalog="laptop")
    ids = [f"img{i:03d}" for i in range(40)]
    commit(target, image_rows(ids, "r1"), key=IMAGE, schema=SCHEMA, run_id="r1")
    info = commit(target, image_rows(ids[:4], "r2"), key=IMAGE, schema=SCHEMA, run_id="r2")
    assert info.rows_replaced == 4
    rows = by_id(read_current(target))
    assert len(rows) == 40
    assert {i for i, r in rows.items() if "/r2/" in r["mask_uri"]} == set(ids[:4])


# -- create, upsert, time travel ---------------------------------------------------------------------
def test_two_nightly_runs_upsert_by_key_in_one_snapshot_each(s3_server, target):
    ids = [f"img{i:04d}" for i in range(300)]
    night1 = image_rows(ids, "night1")
    prepare(target, SCHEMA, IMAGE)  # a missing table is fine, and prepare creates nothing
    assert load_catalog(target.catalog).table_exists(target.table) is False

    props = {"vbatch.model-version": "m1", "vbatch.version": "0.1.0", "vbatch.ok": 300}
    first = commit(
        target,
        stage(s3_server, night1),
        key=IMAGE,
        schema=SCHEMA,
        run_id="night1",
        properties=props,
        storage=s3_server.storage(),
    )
    assert first.created and first.rows == 300 and first.rows_replaced == 0

    # night 2: 10 % of the catalog changed (30 images), plus 20 new images
    changed, new = ids[::10], [f"new{i:03d}" for i in range(20)]
    night2 = image_rows(changed + new, "night2")
    second = commit(
        target,
        stage(s3_server, night2),
        key=IMAGE,
        schema=SCHEMA,
        run_id="night2",
        properties=props,
        storage=s3_server.storage(),
    )
    assert (second.rows, second.rows_replaced, second.attempts) == (50, 30, 1)

    current = by_id(read_current(target))
    assert len(current) == read_current(target).num_rows == 320  # one row per key
    assert sorted(current) == sorted(ids + new)
    for image_id, row in current.items():
        night = "night2" if image_id in changed or image_id in new else "night1"
        assert row["mask_uri"] == f"s3://out/{night}/{image_id}.png"

    history = snapshots(target)
    assert [s.snapshot_id for s in history] == [first.snapshot_id, second.snapshot_id]
    assert [s.summary[RUN_ID] for s in history] == ["night1", "night2"]
    assert [s.summary.operation.value for s in history] == ["append", "overwrite"]
    assert history[1].summary["vbatch.model-version"] == "m1"
    assert history[1].summary["vbatch.rows-replaced"] == "30"
    assert history[1].summary["vbatch.ok"] == "300"

    # time travel: the first snapshot is night 1, row for row
    assert by_id(read_current(target, snapshot_id=first.snapshot_id)) == by_id(night1)
    assert read_current(target, columns=["image_id"]).column_names == ["image_id"]

    # what the commits left is what the table references: no orphan data files
    assert data_files(s3_server, target) >= referenced_files(target)


def test_reuse_gets_the_last_run_and_its_rows_as_parquet_files(target, tmp_path, monkeypatch):
    """What ``--reuse`` from a table reads: the current snapshot's run record, and the current
    rows as Parquet files in vbatch's types (``string``, not pyiceberg's ``large_string``)."""
    from vbatch.operators import lakehouse
    from vbatch.operators.storage import Storage

    ids = [f"img{i:02d}" for i in range(30)]
    commit(target, image_rows(ids, "r1"), key=IMAGE, schema=SCHEMA, run_id="r1")
    commit(
        target,
        image_rows(ids[:3], "r2"),
        key=IMAGE,
        schema=SCHEMA,
        run_id="r2",
        properties={"vbatch.model-identity": "abc", "vbatch.options": '{"size": 320}'},
    )
    summary = lakehouse.current_summary(target)
    assert summary[RUN_ID] == "r2" and summary["vbatch.model-identity"] == "abc"
    assert summary["operation"] == "overwrite"

    monkeypatch.setattr(lakehouse.catalog, "EXPORT_FILE_ROWS", 7)
    columns = ["image_id", "uri", "status", "source_fingerprint", "mask_uri"]
    files = lakehouse.export_current(target, str(tmp_path / "reuse"), Storage(), columns)
    assert len(files) >= 30 // 7
    exported = pa.concat_tables(pq.read_table(f) for f in files)
    assert exported.schema == pa.schema([SCHEMA.field(c) for c in columns])
    assert by_id(exported) == by_id(read_current(target, columns=columns))
    assert by_id(exported)["img01"]["mask_uri"] == "s3://out/r2/img01.png"


def test_a_rerun_of_a_committed_run_adds_no_snapshot(target):
    rows = image_rows([f"img{i}" for i in range(10)], "r1")
    commit(target, rows, key=IMAGE, schema=SCHEMA, run_id="r1")
    again = commit(target, rows, key=IMAGE, schema=SCHEMA, run_id="r1")
    assert again.already_committed and again.files_added == 0
    assert len(snapshots(target)) == 1


def test_files_stay_bounded_across_nights(target):
    """The rows that stay in a partition are written together: repeated upserts keep about two
    files a bucket (what stays, tonight's), not one more per night."""
    ids = [f"img{i:04d}" for i in range(400)]
    commit(target, image_rows(ids, "n0"), key=IMAGE, schema=SCHEMA, run_id="n0")
    counts = []
    for night in range(1, 4):
        commit(
            target,
            image_rows(ids[night::7], f"n{night}"),
            key=IMAGE,
            schema=SCHEMA,
            run_id=f"n{night}",
        )
        counts.append(len(referenced_files(target)))
    assert max(counts) <= 2 * BUCKETS  # without folding small files in: 16 more each night
    assert read_current(target).num_rows == 400


# -- keys -------------------------------------------------------------------------------------------
def test_rows_of_unusable_ids_are_not_committed_and_duplicate_keys_are_refused(target):
    ids = ["a", "b", "b", None, " ", "d"]
    rows = image_rows(ids, "r1").to_pylist()
    # the manifest's key errors as the jobs word them; an empty uri leaves the id usable
    uris = ["a.jpg", "b.jpg", "b2.jpg", "x.jpg", "y.jpg", ""]
    for row, error in zip(rows, image_row_errors(ids, uris), strict=True):
        if error is not None:
            row.update(status="error", error=error, error_class="input")
    info = commit(
        target, pa.Table.from_pylist(rows, schema=SCHEMA), key=IMAGE, schema=SCHEMA, run_id="r1"
    )
    assert (info.rows, info.rows_skipped) == (3, 3)
    stored = by_id(read_current(target))
    assert sorted(stored) == ["a", "b", "d"]
    assert stored["b"]["status"] == "ok" and stored["d"]["error"] == "manifest row 5: uri is empty"

    twice = image_rows(["c", "c"], "r2")
    with pytest.raises(IcebergError, match=r"1 key\(s\) of \(image_id\).*\(c\)"):
        commit(target, twice, key=IMAGE, schema=SCHEMA, run_id="r2")
    assert len(snapshots(target)) == 1


def test_embeddings_round_trip(target):
    """``reid embed``'s table: its fixed-size vectors are Iceberg lists, read back as written."""
    schema = image_results_schema("embedding", embedding_dim=4)
    ids = ["a", "b", "c"]
    base = image_rows(ids, "r1").drop_columns(["mask_uri", "foreground_ratio"])
    vectors = pa.array([[i, 0.5, -1.0, 2.0] for i in range(3)], pa.list_(pa.float32(), 4))
    rows = base.append_column(schema.field("embedding"), vectors).cast(schema)
    commit(target, rows, key=JOB_KEYS["reid-embed"], schema=schema, run_id="r1")
    back = read_current(target).sort_by("image_id")
    assert back.column("embedding").cast(vectors.type).equals(pa.chunked_array([vectors]))


def video_rows(video: str, frames: list[int | None], run: str) -> list[dict]:
    ok = frames and frames[0] is not None
    return [
        {
            "video_id": video,
            "uri": f"{video}.mp4",
            "query_index": q,
            "query": f"query {q}",
            "frame_index": f,
            "timestamp_s": None if f is None else f / 25,
            "status": "ok" if ok else "error",
            "mask_uri": f"s3://out/{run}/{video}/{q}/{f}.png" if ok else None,
            "error": None if ok else "cannot decode video",
            "model_version": "m1",
            "manifest_row": 0,
        }
        for q in (0, 1)
        for f in frames
    ]


def test_a_video_is_replaced_as_a_whole(target):
    """Key (video_id, query_index, frame_index), replaced by video_id: a video that failed tonight
    keeps tonight's error rows only, none of last night's frames; other videos stay."""
    key = JOB_KEYS["video"]
    night1 = pa.Table.from_pylist(
        video_rows("v1", [0, 5, 10], "n1") + video_rows("v2", [0, 5], "n1"), schema=VIDEO_RESULTS
    )
    commit(target, night1, key=key, schema=VIDEO_RESULTS, run_id="n1")
    night2 = pa.Table.from_pylist(video_rows("v1", [None], "n2"), schema=VIDEO_RESULTS)
    info = commit(target, night2, key=key, schema=VIDEO_RESULTS, run_id="n2")
    assert (info.rows, info.rows_replaced) == (2, 6)
    rows = read_current(target).to_pylist()
    assert sorted(
        (r["video_id"], r["query_index"], r["frame_index"], r["status"]) for r in rows
    ) == [
        ("v1", 0, None, "error"),
        ("v1", 1, None, "error"),
        ("v2", 0, 0, "ok"),
        ("v2", 0, 5, "ok"),
        ("v2", 1, 0, "ok"),
        ("v2", 1, 5, "ok"),
    ]


# -- schema ------------------------------------------------------------------------------------------
def test_a_new_nullable_column_evolves_the_table(target):
    ids = [f"img{i}" for i in range(20)]
    first = commit(target, image_rows(ids, "r1"), key=IMAGE, schema=SCHEMA, run_id="r1")
    wider = SCHEMA.append(pa.field("brand", pa.string()))
    prepare(target, wider, IMAGE)
    info = commit(
        target,
        image_rows(ids[:5], "r2", wider, brand=["acme"] * 5),
        key=IMAGE,
        schema=wider,
        run_id="r2",
    )
    assert info.columns_added == ("brand",)
    brands = {r["image_id"]: r["brand"] for r in read_current(target).to_pylist()}
    assert brands == {i: "acme" if i in ids[:5] else None for i in ids}
    # time travel reads the first snapshot with the schema it was written with
    assert "brand" not in read_current(target, snapshot_id=first.snapshot_id).column_names


def _width_as_string(rows: pa.Table) -> pa.Table:
    i = rows.schema.get_field_index("width")
    return rows.set_column(i, pa.field("width", pa.string()), rows.column(i).cast(pa.string()))


def _ratio_as_list(rows: pa.Table) -> pa.Table:
    i = rows.schema.get_field_index("foreground_ratio")
    values = pa.array([[v] for v in rows.column(i).to_pylist()], pa.list_(pa.float32()))
    return rows.set_column(i, pa.field("foreground_ratio", values.type), values)


def _untyped_column(rows: pa.Table) -> pa.Table:
    return rows.append_column(pa.field("empty", pa.null()), pa.nulls(rows.num_rows))


@pytest.mark.parametrize(
    ("change", "column"),
    [(_width_as_string, "width"), (_ratio_as_list, "foreground_ratio"), (_untyped_column, "empty")],
)
def test_an_incompatible_schema_is_refused_before_anything_is_written(
    s3_server, target, change, column
):
    commit(target, image_rows(["a", "b"], "r1"), key=IMAGE, schema=SCHEMA, run_id="r1")
    files = data_files(s3_server, target)
    rows = change(image_rows(["a"], "r2"))
    with pytest.raises(IcebergError, match=f"column '{column}'"):
        prepare(target, rows.schema, IMAGE)
    with pytest.raises(IcebergError, match=f"column '{column}'"):
        commit(target, rows, key=IMAGE, schema=rows.schema, run_id="r2")
    assert len(snapshots(target)) == 1 and data_files(s3_server, target) == files


def test_another_key_is_refused(target):
    commit(target, image_rows(["a"], "r1"), key=IMAGE, schema=SCHEMA, run_id="r1")
    with pytest.raises(IcebergError, match=r"keyed by \(image_id\), the job by \(image_id, uri\)"):
        prepare(target, SCHEMA, ["image_id", "uri"])


# -- failures and conflicts --------------------------------------------------------------------------
def test_a_commit_that_fails_midway_leaves_the_previous_snapshot(s3_server, target, monkeypatch):
    ids = [f"img{i}" for i in range(30)]
    first = commit(target, image_rows(ids, "r1"), key=IMAGE, schema=SCHEMA, run_id="r1")

    def crash(*args, **kwargs):
        raise OSError("store went away while rewriting")

    monkeypatch.setattr(commit_module, "_rewrite_partition", crash)
    with pytest.raises(OSError, match="went away"):
        commit(target, image_rows(ids[:3], "r2"), key=IMAGE, schema=SCHEMA, run_id="r2")
    assert [s.snapshot_id for s in snapshots(target)] == [first.snapshot_id]
    assert by_id(read_current(target)) == by_id(read_current(target, snapshot_id=first.snapshot_id))
    # the files it had written (the run's rows) were deleted
    assert data_files(s3_server, target) == referenced_files(target)


def _another_writer_commits_first(monkeypatch, target, rows: pa.Table, times: int) -> list[int]:
    """Before each of our next ``times`` commits reaches the catalog, another writer appends
    ``rows`` (a real concurrent commit on the real catalog). Returns its snapshot ids."""
    from pyiceberg.table import Transaction

    original = Transaction.commit_transaction
    theirs: list[int] = []

    def racing(self):
        if len(theirs) < times and not racing.busy:
            racing.busy = True  # the other writer's own commit goes straight through
            try:
                table = load_catalog(target.catalog).load_table(target.table)
                table.append(rows.cast(table.schema().as_arrow()))
                theirs.append(table.refresh().current_snapshot().snapshot_id)
            finally:
                racing.busy = False
        return original(self)

    racing.busy = False
    monkeypatch.setattr(Transaction, "commit_transaction", racing)
    monkeypatch.setattr(commit_module, "BACKOFF_BASE_S", 0.01)
    return theirs


def test_a_conflicting_commit_is_retried_from_a_fresh_plan(target, monkeypatch):
    ids = [f"img{i:03d}" for i in range(50)]
    commit(target, image_rows(ids, "r1"), key=IMAGE, schema=SCHEMA, run_id="r1")
    # the other writer adds a row with one of our keys, and one of its own
    other = image_rows(["img007", "zz-other"], "other")
    theirs = _another_writer_commits_first(monkeypatch, target, other, times=1)
    info = commit(target, image_rows(ids[:10], "r2"), key=IMAGE, schema=SCHEMA, run_id="r2")
    assert info.attempts == 2 and len(theirs) == 1
    assert len(info.conflicts) == 1 and "ValidationException" in info.conflicts[0], info.conflicts
    rows = by_id(read_current(target))
    assert len(rows) == read_current(target).num_rows == 51  # one row per key
    assert rows["img007"]["mask_uri"] == "s3://out/r2/img007.png"  # ours, committed last
    assert rows["zz-other"]["mask_uri"] == "s3://out/other/zz-other.png"
    assert [s.summary.get(RUN_ID) for s in snapshots(target)] == ["r1", None, "r2"]


def test_two_runs_creating_the_table_at_once(target, monkeypatch):
    """The table appears between our look-up and our create: the create fails at the catalog,
    the retry upserts into the other run's table."""
    ids = [f"img{i}" for i in range(10)]
    commit(target, image_rows(ids, "theirs"), key=IMAGE, schema=SCHEMA, run_id="theirs")
    looked_up = []

    def missing_once(catalog, target):
        looked_up.append(target)
        return None if len(looked_up) == 1 else load_table(catalog, target)

    monkeypatch.setattr(commit_module, "load_table", missing_once)
    info = commit(target, image_rows(ids[:2], "ours"), key=IMAGE, schema=SCHEMA, run_id="ours")
    assert info.attempts == 2 and info.conflicts[0].startswith("CommitFailedException")
    assert not info.created and info.rows_replaced == 2
    assert [s.summary[RUN_ID] for s in snapshots(target)] == ["theirs", "ours"]
    assert read_current(target).num_rows == 10


def test_a_commit_that_keeps_losing_gives_up_and_cleans_up(s3_server, target, monkeypatch):
    commit(target, image_rows(["a", "b"], "r1"), key=IMAGE, schema=SCHEMA, run_id="r1")
    theirs = _another_writer_commits_first(monkeypatch, target, image_rows(["c"], "other"), times=3)
    with pytest.raises(CommitConflictError, match="all 3 attempts"):
        commit(target, image_rows(["a"], "r2"), key=IMAGE, schema=SCHEMA, run_id="r2", attempts=3)
    assert [s.summary.get(RUN_ID) for s in snapshots(target)] == ["r1", None, None, None]
    assert len(theirs) == 3
    # every data file of the lost attempts was deleted
    assert data_files(s3_server, target) == referenced_files(target)


# -- other readers -----------------------------------------------------------------------------------
def _duckdb_extensions() -> list[str]:
    """The Iceberg extension and what it needs, from their wheels (DuckDB would download them)."""
    found = []
    for name in ("httpfs", "avro", "iceberg"):
        paths = [
            p
            for sp in site.getsitepackages()
            for p in glob.glob(f"{sp}/duckdb_extension_{name}/extensions/*/{name}.duckdb_extension")
        ]
        if not paths:
            pytest.skip(f"DuckDB's {name} extension is not installed (duckdb-extension-{name})")
        found.append(paths[0])
    return found


def test_duckdb_reads_the_table_and_its_first_snapshot(s3_server, iceberg_catalog, target):
    duckdb = pytest.importorskip("duckdb")
    extensions = _duckdb_extensions()
    ids = [f"img{i:03d}" for i in range(40)]
    first = commit(target, image_rows(ids, "r1"), key=IMAGE, schema=SCHEMA, run_id="r1")
    commit(target, image_rows(ids[:4], "r2"), key=IMAGE, schema=SCHEMA, run_id="r2")

    con = duckdb.connect(
        config={"autoinstall_known_extensions": False, "autoload_known_extensions": False}
    )
    for path in extensions:
        con.execute(f"LOAD '{path}'")
    props = iceberg_catalog.properties
    user, secret = props["credential"].split(":")
    s3 = s3_server.endpoint.removeprefix("http://")
    con.execute(
        f"CREATE SECRET (TYPE S3, KEY_ID '{user}', SECRET '{secret}', ENDPOINT '{s3}', URL_STYLE 'path', USE_SSL false, REGION 'us-east-1')"
    )
    con.execute(
        f"CREATE SECRET cat (TYPE ICEBERG, CLIENT_ID '{user}', CLIENT_SECRET '{secret}', OAUTH2_SERVER_URI '{props['oauth2-server-uri']}')"
    )
    warehouse = props["warehouse"].removeprefix("s3://")
    con.execute(
        f"ATTACH '{warehouse}' AS lake (TYPE ICEBERG, ENDPOINT '{props['uri']}', SECRET cat)"
    )
    table = f"lake.{target.table}"
    per_run = con.sql(
        f"SELECT split_part(mask_uri, '/', 4) AS run, count(*) FROM {table} GROUP BY 1 ORDER BY 1"
    )
    assert per_run.fetchall() == [("r1", 36), ("r2", 4)]
    then = con.sql(
        f"SELECT count(*), min(mask_uri) FROM {table} AT (VERSION => {first.snapshot_id})"
    )
    assert then.fetchall() == [(40, "s3://out/r1/img000.png")]
