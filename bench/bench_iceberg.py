"""Benchmark: commit time and data-file count of Iceberg upserts (vbatch.operators.lakehouse).

Night 1 commits N segment result rows into a new table; then, nightly, a run over the whole
catalog with a fraction of its images changed (``full``: N rows, every key replaced; the unchanged
rows come back identical, as ``--reuse`` copies them) and a run of the changed images only
(``partial``). The run's rows come from staged Parquet files on local disk, as a job leaves them.
Prints, per commit: wall time, rows replaced, data files added/removed, the table's data files
after it, and the process's peak RSS so far.

The catalog: ``--catalog sql`` (default) is pyiceberg's SqlCatalog on sqlite with a local
warehouse (the store's speed out of the way); ``--catalog seaweedfs`` starts a SeaweedFS server
with its Iceberg REST catalog, as the tests do (needs the dev extra's ``weed``).

    python bench/bench_iceberg.py --rows 100000 --changed 0.1
    python bench/bench_iceberg.py --rows 100000 --changed 0.1 --catalog seaweedfs
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent


def rows(ids: list[str], night: str) -> pa.Table:
    from vbatch.schemas.images import image_results_schema

    n = len(ids)
    return pa.table(
        {
            "image_id": ids,
            "uri": [f"s3://catalog/images/{i}.jpg" for i in ids],
            "task": ["salient"] * n,
            "status": ["ok"] * n,
            "error": pa.nulls(n, pa.string()),
            "error_class": pa.nulls(n, pa.string()),
            "width": pa.array([800] * n, pa.int32()),
            "height": pa.array([600] * n, pa.int32()),
            "model_version": ["3f2a9c1e"] * n,
            "processed_at": [datetime(2026, 11, 30, tzinfo=timezone.utc)] * n,
            "source_fingerprint": [f"etag:{uuid.uuid5(uuid.NAMESPACE_URL, i).hex}" for i in ids],
            "mask_uri": [f"s3://results/{night}/masks/{i}.png" for i in ids],
            "foreground_ratio": pa.array([0.3] * n, pa.float32()),
        },
        schema=image_results_schema("mask"),
    )


def stage(table: pa.Table, folder: Path, parts: int = 8) -> list[str]:
    """``table`` as ``parts`` Parquet files, the way a job's staging folder holds its rows."""
    folder.mkdir(parents=True)
    step = -(-table.num_rows // parts)
    files = []
    for i in range(parts):
        files.append(str(folder / f"part-{i}.parquet"))
        pq.write_table(table.slice(i * step, step), files[-1])
    return files


def sql_catalog(work: Path) -> dict[str, str]:
    (work / "warehouse").mkdir()
    return {
        "type": "sql",
        "uri": f"sqlite:///{work}/catalog.db",
        "warehouse": f"file://{work}/warehouse",
    }


def seaweedfs_catalog(work: Path):
    """A SeaweedFS server with its Iceberg REST catalog and a table bucket (tests/conftest.py's
    server and tests/iceberg_server.py's set-up); returns (server, catalog properties)."""
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "vbatch-bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "vbatch-bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    import boto3

    from tests.conftest import S3Server, _free_port, _weed
    from tests.iceberg_server import _wait_for_catalog

    ports = {k: _free_port() for k in ("s3", "master", "volume", "filer", "iceberg")}
    (work / "weed").mkdir()
    cmd = [
        _weed(),
        "server",
        f"-dir={work / 'weed'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-s3",
        f"-s3.port={ports['s3']}",
        f"-master.port={ports['master']}",
        f"-volume.port={ports['volume']}",
        f"-filer.port={ports['filer']}",
        "-s3.port.lance=0",
        f"-s3.port.iceberg={ports['iceberg']}",
        "-master.volumeSizeLimitMB=64",
        "-volume.max=200",
    ]
    server = S3Server(cmd, work / "weed")
    server.start()
    boto3.client("s3tables", endpoint_url=server.endpoint).create_table_bucket(name="bench")
    key, secret = os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
    props = {
        "type": "rest",
        "uri": server.iceberg_endpoint,
        "warehouse": "s3://bench",
        "credential": f"{key}:{secret}",
        "oauth2-server-uri": f"{server.iceberg_endpoint}/v1/oauth/tokens",
        "s3.endpoint": server.endpoint,
        "s3.access-key-id": key,
        "s3.secret-access-key": secret,
        "s3.region": os.environ["AWS_DEFAULT_REGION"],
    }
    _wait_for_catalog(server.iceberg_endpoint, props)
    return server, props


def configure(name: str, props: dict[str, str]) -> None:
    for k, v in props.items():
        os.environ[
            f"PYICEBERG_CATALOG__{name.upper()}__{k.replace('.', '__').replace('-', '_').upper()}"
        ] = v


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--changed", type=float, default=0.1, help="fraction of images changed a night")
    p.add_argument("--nights", type=int, default=3, help="nights after the first, of each kind")
    p.add_argument("--catalog", choices=["sql", "seaweedfs"], default="sql")
    args = p.parse_args()

    from vbatch.operators.lakehouse import JOB_KEYS, IcebergTarget, commit, load_catalog
    from vbatch.schemas.images import image_results_schema

    work = Path(tempfile.mkdtemp(prefix="vbatch-bench-iceberg-"))
    server = None
    if args.catalog == "sql":
        props = sql_catalog(work)
    else:
        server, props = seaweedfs_catalog(work)
    configure("bench", props)
    load_catalog("bench")  # imports and connects before the first timed commit
    import pyiceberg.io.pyarrow  # noqa: F401 (the writer's import, out of night 1's time)

    schema = image_results_schema("mask")
    key = JOB_KEYS["segment"]
    ids = [f"sku-{i:08d}" for i in range(args.rows)]
    n_changed = int(args.rows * args.changed)
    print(f"catalog {args.catalog}; {args.rows} rows; {n_changed} changed a night")
    print(
        f"{'commit':<22} {'rows':>8} {'replaced':>9} {'s':>6} {'+files':>7} {'-files':>7} "
        f"{'table files':>11} {'MB':>7} {'peak RSS MB':>11}"
    )
    try:
        for kind in ("full", "partial"):
            target = IcebergTarget(f"bench.segment_{kind}", catalog="bench")
            plan = [("night 1", ids, ids)]
            for night in range(2, args.nights + 2):
                changed = ids[night % 10 :: max(1, int(1 / args.changed))][:n_changed]
                plan.append((f"night {night} {kind}", ids if kind == "full" else changed, changed))
            for name, run_ids, changed in plan:
                run = name.replace(" ", "-")
                changed_set = set(changed)
                # unchanged images come back with the row of the night that last changed them
                table = rows(run_ids, run)
                if name != "night 1":
                    keep = [i not in changed_set for i in run_ids]
                    old = read_back(target, run_ids, keep)
                    table = pa.concat_tables([table.filter(pa.array([not k for k in keep])), old])
                files = stage(table, work / "staging" / kind / run)
                start = time.perf_counter()
                info = commit(target, files, key=key, schema=schema, run_id=run)
                seconds = time.perf_counter() - start
                tbl = load_catalog("bench").load_table(target.table)
                tasks = list(tbl.scan().plan_files())
                size = sum(t.file.file_size_in_bytes for t in tasks) / 1e6
                print(
                    f"{name:<22} {info.rows:>8} {info.rows_replaced:>9} {seconds:>6.2f} "
                    f"{info.files_added:>7} {info.files_removed:>7} {len(tasks):>11} {size:>7.1f} "
                    f"{peak_rss_mb():>11.0f}"
                )
            assert tbl.scan().to_arrow().num_rows == args.rows
    finally:
        if server is not None:
            server.stop()


def read_back(target, run_ids: list[str], keep: list[bool]) -> pa.Table:
    """The current rows of the unchanged images of ``run_ids`` (what ``--reuse`` copies)."""
    from vbatch.operators.lakehouse import read_current
    from vbatch.schemas.images import image_results_schema

    wanted = pa.array([i for i, k in zip(run_ids, keep, strict=True) if k], pa.string())
    current = read_current(target)
    unchanged = current.filter(pc.is_in(current.column("image_id").cast(pa.string()), wanted))
    return unchanged.cast(image_results_schema("mask"))


if __name__ == "__main__":
    main()
