"""``vbatch segment``: image manifest in, one product per image plus a results table out.

Stages (Ray Data, streaming)::

    read manifest (Ray, through the job's filesystem) → fetch bytes (CPU tasks, I/O threads)
    → decode + preprocess (CPU tasks) → model (actor pool, one model per actor, GPU when present)
    → postprocess + write products (CPU tasks) → results Parquet

The same job serves every per-image model (``segment``'s tasks and ``reid embed``), configured by
:class:`ImageJobConfig`; its stages are the image pipeline's (:mod:`vbatch.jobs.image_pipeline`).
Results are staged under ``<out>/.staging/<run key>/`` (a rerun after a
crash resumes from there: :mod:`vbatch.jobs.resume`), counted, and
committed as a new generation of ``<out>/results/`` (:mod:`vbatch.jobs.publish`), so a repeated run
never leaves duplicate rows and readers never see a partial table. Every manifest row comes out
exactly once, ``ok`` or ``error``; the job checks that before it publishes.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray

from vbatch.jobs.config import key_fields, pool_fields, reuse_fields
from vbatch.jobs.finish import Outcome, Tail, finish
from vbatch.jobs.image_pipeline import (
    ImageJobConfig,
    ImagePipeline,
    cpu_stages,
    fault_stage,
    model_stage,
    model_stages,
    output_options,
    prepare_image_job,
    tag_partition,
    write_partitioned,
    write_stage,
)
from vbatch.jobs.lakehouse import check_table, table_step, target_of
from vbatch.jobs.lease import Lease
from vbatch.jobs.limits import Limits
from vbatch.jobs.publish import read_files, report_details, stage, stage_partitions
from vbatch.jobs.resume import (
    dedupe_staged,
    drop_done,
    file_fingerprints,
    previous_attempt,
    run_key,
)
from vbatch.jobs.runtime import ensure_ray, refuse_local_paths_on_cluster, releases_actors
from vbatch.jobs.summary import Counts, JobFailed, RunClock, count_rows
from vbatch.models import model_entry
from vbatch.models import model_version as weights_version
from vbatch.operators.lakehouse.catalog import MODEL_IDENTITY, OPTIONS, OUT
from vbatch.operators.manifest import ManifestInfo, manifest_files
from vbatch.operators.outputs import OutputOptions
from vbatch.operators.quality import GT_COLUMN, metric_kind
from vbatch.operators.reuse import (
    Previous,
    carry_forward,
    fingerprint_column,
    keep,
    list_fingerprints,
    manifest_uris,
    mark,
    model_identity,
    previous_run,
)
from vbatch.operators.storage import Storage, StorageOptions, join, normalize
from vbatch.operators.tables import STAGING, product_root
from vbatch.schemas.images import PRODUCT_URI_COLUMNS, image_results_schema, metric_fields

__all__ = ["ImageJobConfig", "JobSummary", "PoolMismatch", "run_image_job", "run_image_jobs"]

logger = logging.getLogger(__name__)


@dataclass
class JobSummary:
    task: str
    rows: int
    ok: int
    error: int
    seconds: float
    results_uri: str
    out: str
    model_version: str | None
    resources: str
    #: a few (image_id, error) pairs to show
    sample_errors: list[tuple[str | None, str]]
    #: the machine-readable summary (jobs.summary.job_record), also in <out>/run.json
    record: dict[str, Any] = field(default_factory=dict)
    #: rows taken from the staged files of a crashed attempt of the same run (jobs.resume)
    resumed_rows: int = 0
    #: rows carried forward from an earlier run (--reuse)
    reused_rows: int = 0

    @property
    def images_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        return int(self.record.get("exit_code", 0))

    def report(self) -> str:
        headline = (
            f"{self.task}: {self.rows} rows — {self.ok} ok, {self.error} error — "
            f"{self.seconds:.1f} s, {self.images_per_second:.2f} images/s ({self.resources})"
        )
        by_class = self.record.get("by_error_class") or {}
        classes = (
            ("errors by class: " + ", ".join(f"{k} {v}" for k, v in sorted(by_class.items())),)
            if by_class
            else ()
        )
        resumed: tuple[str, ...] = ()
        if self.resumed_rows:
            resumed += (
                f"resumed: {self.resumed_rows} rows staged by an unfinished earlier attempt",
            )
        if self.reused_rows:
            resumed += (
                f"reused: {self.reused_rows} unchanged rows carried forward (not fetched or inferred)",
            )
        details = report_details(
            self.results_uri,
            self.model_version,
            self.sample_errors,
            self.error,
            extra=classes + resumed,
        )
        return "\n".join([headline, *details])


@releases_actors
def run_image_job(
    cfg: ImageJobConfig, clock: RunClock | None = None, command: str | None = None
) -> JobSummary:
    """Run the job; returns the summary.

    Args:
        cfg: the job's configuration.
        clock: the run's id and start time (the CLI's, so that its summary and run.json agree).
        command: the command named in the summary (default ``"segment"``).

    Raises:
        Exception: on problems with the job as a whole (bad manifest columns, unreadable model
            directory, more infrastructure errors than ``cfg.max_infra_error_rate``:
            :class:`vbatch.jobs.summary.JobFailed`), never on problems with single images.
            Nothing new is published then.
    """
    clock = clock or RunClock()
    command = command or "segment"
    storage = Storage(StorageOptions(endpoint_url=cfg.s3_endpoint))
    ensure_ray(cfg.address, forward_s3_env=cfg.forward_s3_env)
    part = _plan(cfg, storage, clock, command)
    with part.lease:
        ds = fault_stage(part.p, model_stages(part.p, part.cfg, part.ds))
        ds = write_stage(part.p, ds, part.options)
        carried = _carried(part)
        if carried is not None:
            ds = ds.union(carried)
        staged = stage(ds, part.out, storage, part.key)
        return _finish(part, clock, command, staged)


@releases_actors
def run_image_jobs(
    cfgs: list[ImageJobConfig], clocks: list[RunClock], command: str | None = None
) -> list[JobSummary | Exception]:
    """Run several image jobs of the same model as one Ray Data pipeline through **one actor
    pool** (``vbatch backfill``): each job's manifest is fetched and decoded on its own, the
    decoded rows of all jobs share the model's actors, and each job's result rows are staged,
    checked and published to its own ``--out`` as :func:`run_image_job` would.

    Args:
        cfgs: the jobs; they may differ only in ``manifest``, ``out``, ``reuse`` and ``limit``.
        clocks: one per job (each publishes its own generation under its own run id).
        command: the command named in the summaries.

    Returns:
        Per job, its summary, or the exception that failed it (a job that fails its own checks
        fails alone; the others still publish).

    Raises:
        PoolMismatch: the jobs differ in more than those fields.
        Exception: the shared pipeline failed (nothing new is published; the staged rows of
            every job remain for a rerun to resume from).
    """
    first = cfgs[0]
    for c in cfgs[1:]:
        if pool_fields(c) != pool_fields(first) or c.model_dir != first.model_dir:
            raise PoolMismatch(
                "one actor pool needs one model configuration: these jobs differ in more than "
                "--manifest, --out, --reuse, --limit and the error limits"
            )
    command = command or "segment"
    storage = Storage(StorageOptions(endpoint_url=first.s3_endpoint))
    ensure_ray(first.address, forward_s3_env=first.forward_s3_env)
    results: list[JobSummary | Exception | None] = [None] * len(cfgs)
    parts: dict[int, _Partition] = {}
    try:
        for i, c in enumerate(cfgs):
            try:
                parts[i] = _plan(c, storage, clocks[i], command)
            except Exception as e:  # this job's manifest, output or lease: it fails alone
                results[i] = e
        _run_partitions(parts, cfgs, clocks, command, storage, results)
    finally:
        for part in parts.values():
            part.lease.release()
    return [r if r is not None else RuntimeError("not run") for r in results]


def _run_partitions(
    parts: dict[int, _Partition],
    cfgs: list[ImageJobConfig],
    clocks: list[RunClock],
    command: str,
    storage: Storage,
    results: list[JobSummary | Exception | None],
) -> None:
    """The planned jobs through one pipeline; each one's summary or error into ``results``."""
    first = cfgs[0]
    if parts:
        p0 = next(iter(parts.values())).p
        inputs = [
            cpu_stages(part.p, cfgs[i], part.ds).map_batches(
                tag_partition,  # type: ignore[arg-type]
                fn_kwargs={"partition": i},
                **{**part.p.cpu_stage, "batch_size": None},
            )
            for i, part in parts.items()
        ]
        ds = inputs[0].union(*inputs[1:]) if len(inputs) > 1 else inputs[0]
        ds = model_stage(p0, first, ds)
        ds = ds.map_batches(
            write_partitioned,  # type: ignore[arg-type]
            fn_kwargs={
                "transforms": p0.transforms,
                "options": {i: part.options for i, part in parts.items()},
                "storage": storage,
            },
            **{**p0.cpu_stage, "batch_size": None},
        )
        for i, part in parts.items():
            carried = _carried(part)
            if carried is not None:
                ds = ds.union(
                    carried.map_batches(
                        tag_partition,  # type: ignore[arg-type]
                        fn_kwargs={"partition": i},
                        **{**part.p.cpu_stage, "batch_size": None},
                    )
                )
        staged = stage_partitions(
            ds, {i: (part.out, part.key) for i, part in parts.items()}, storage
        )
        for i, part in parts.items():
            try:
                results[i] = _finish(part, clocks[i], command, staged[i])
            except Exception as e:
                results[i] = e


class PoolMismatch(ValueError):
    """Jobs that cannot share one actor pool (another model, other model options)."""


@dataclass
class _Partition:
    """One job planned on the driver: its pipeline pieces, its staging key and what it reuses."""

    cfg: ImageJobConfig
    out: str
    p: ImagePipeline
    key: str
    previous: Any  # jobs.resume.PreviousAttempt
    identity: str
    #: the manifest rows to process (after resume and --reuse)
    ds: ray.data.Dataset
    #: the rows --reuse carries forward, and the earlier run's rows
    carried: ray.data.Dataset | None
    reusable: Previous | None
    options: OutputOptions
    #: the job's lease on ``out``, held from the plan to the end (released by the caller)
    lease: Lease


def image_run_key(
    cfg: ImageJobConfig,
    storage: Storage,
    files: list[str] | None = None,
    local_model_dir: Path | None = None,
) -> tuple[str, str]:
    """(the run key, the model's identity) of an image job: the key a crashed run's rerun stages
    under (``jobs.resume``) and a backfill's ledger compares: a hash of the configuration fields
    that decide results (``jobs.config.key_fields``), the manifest files as listed (size and ETag
    or modification time) and the model's content identity (``operators.reuse.model_identity``:
    the weights' hash and the other files', never a cache's modification times, so a fresh
    node that downloads the same model resumes)."""
    local = local_model_dir or storage.localize_dir(cfg.model_dir)
    identity = model_identity(weights_version(cfg.task, local), local)
    files = files if files is not None else manifest_files(cfg.manifest, storage)
    return run_key(key_fields(cfg), file_fingerprints(files, storage), [identity]), identity


def _plan(cfg: ImageJobConfig, storage: Storage, clock: RunClock, command: str) -> _Partition:
    """Take ``--out``'s lease, check the job, read its manifest, find what a crashed attempt
    staged and what ``--reuse`` carries forward (after :func:`vbatch.jobs.runtime.ensure_ray`)."""
    entry = model_entry(cfg.task)
    if entry.output not in ("mask", "rgba", "embedding"):
        raise ValueError(
            f"--task {cfg.task} produces {entry.output}s; it has its own command (see vbatch --help)"
        )
    if cfg.mask_size != "full" and entry.output != "mask":
        raise ValueError(
            f"--mask-size {cfg.mask_size} is for mask tasks; {cfg.task} writes {entry.output}s"
        )
    out = normalize(cfg.out)
    refuse_local_paths_on_cluster(
        {"--manifest": cfg.manifest, "--model-dir": cfg.model_dir, "--out": cfg.out}
    )
    lease = Lease(out, storage, clock.run_id, command, cfg.break_lease)
    lease.__enter__()
    try:
        return _plan_leased(cfg, storage, clock, out, lease, command)
    except BaseException:
        lease.release()
        raise


def _plan_leased(
    cfg: ImageJobConfig, storage: Storage, clock: RunClock, out: str, lease: Lease, command: str
) -> _Partition:
    p = prepare_image_job(cfg, storage)
    cfg = p.cfg  # the precision resolved: it decides results, so it is in the key
    # an Iceberg table that cannot take the results fails the job here, before any work
    check_table(target_of(cfg.table, cfg.catalog), command, results_schema(p))
    # staged under a key of what decides the results: the rerun of a crashed run finds its files
    # and skips their rows before anything is fetched (jobs.resume)
    key, identity = image_run_key(cfg, storage, list(p.info.files), p.local_model_dir)
    previous = previous_attempt(out, storage, key)
    ds = p.ds
    if previous.rows:
        ds = ds.map_batches(
            drop_done,  # type: ignore[arg-type]
            fn_kwargs={"done_ids": previous.done_ids, "done_rows": previous.done_rows},
            **{**p.cpu_stage, "udf_modifying_row_count": True},
        )
    ds, carried, reusable = _split_reused(ds, cfg, p.info, storage, identity, p.cpu_stage, out)
    # this run's products go to its own folder: no other run ever writes there
    options = output_options(p, cfg, product_root(out, clock.run_id))
    return _Partition(cfg, out, p, key, previous, identity, ds, carried, reusable, options, lease)


def results_schema(p: ImagePipeline) -> pa.Schema:
    """The columns an image job's result rows will have: the output's, the ground-truth metrics
    when the manifest has a ground-truth column, the manifest's own (as ``write_products`` builds
    the rows)."""
    dim = getattr(p.transforms, "embed_dim", None)
    fields = list(image_results_schema(p.entry.output, embedding_dim=dim))
    if GT_COLUMN in p.info.passthrough.names:
        fields += metric_fields(metric_kind(p.cfg.task))
    names = {f.name for f in fields}
    return pa.schema(fields + [f for f in p.info.passthrough if f.name not in names])


def _carried(part: _Partition) -> ray.data.Dataset | None:
    """The result rows of the rows ``--reuse`` carries forward (products copied into ``out``)."""
    if part.carried is None or part.reusable is None:
        return None
    return part.carried.map_batches(
        carry_forward,  # type: ignore[arg-type]
        fn_kwargs={
            "previous": part.reusable,
            "out": part.out,
            "product_root": part.options.out_uri,
            "task": part.cfg.task,
            "output": part.p.entry.output,
            "embedding_dim": part.options.embedding_dim,
            "storage": part.p.storage,
        },
        **part.p.cpu_stage,
    )


def _finish(part: _Partition, clock: RunClock, command: str, staged: list[str]) -> JobSummary:
    """Count the staged rows, check them, publish, write run.json (:func:`vbatch.jobs.finish`);
    the job's summary."""
    cfg, out, info = part.cfg, part.out, part.p.info
    reused_rows = (
        part.carried.count() if part.carried is not None and part.reusable is not None else 0
    )

    def account(staged: list[str]) -> Outcome:
        # counted on the staged files, before anything is published: a job that fails its checks
        # leaves the previous table committed
        columns = ["image_id", "status", "error", "error_class", "model_version"]
        columns += [c for c in PRODUCT_URI_COLUMNS if c in part.options.product_columns]

        def count(files: list[str]) -> tuple[Any, Counts]:
            table = read_files(files, part.p.storage, columns) if files else None
            return table, (
                count_rows(table, "image_id") if table is not None else Counts(0, {}, {}, [])
            )

        table, counts = count(staged)
        files = None
        if counts.rows > info.num_rows:  # a retried task staged rows twice: keep one of each
            files, _ = dedupe_staged(staged, part.p.storage)
            table, counts = count(files)
        if counts.rows != info.num_rows:
            raise JobFailed(
                f"accounting error: the manifest has {info.num_rows} rows but the results have "
                f"{counts.rows}"
            )
        return Outcome(counts, counts.rows, table, files=files)

    def facts(outcome: Outcome, generation: str) -> dict[str, Any]:
        seconds = clock.seconds()
        return {
            "task": cfg.task,
            "model_version": _model_version(outcome.table),
            "images_per_second": outcome.rows / seconds if seconds > 0 else 0.0,
            "out": out,
            "results_uri": join(out, "results"),
            "generation": generation,
            "resources": part.p.res.describe(),
            "precision": cfg.precision,
            "precision_reason": part.p.precision_reason,
            # rows an earlier, crashed attempt of this run had staged: not fetched or inferred
            "resumed_rows": part.previous.rows,
            # rows carried forward from --reuse: not fetched or inferred either
            "reused_rows": reused_rows,
        }

    tail = Tail(
        command=command,
        out=out,
        storage=part.p.storage,
        limits=Limits(cfg.max_error_rate, cfg.max_infra_error_rate),
        what="images",
        account=account,
        facts=facts,
        staging_key=part.key,
        run_extra={
            "config": asdict(cfg),
            "manifest_files": info.files,
            "model_identity": part.identity,
            "run_key": part.key,
        },
        # what a later --reuse of this generation compares (operators.reuse), and a backfill's
        # ledger (jobs.backfill)
        commit={
            "task": cfg.task,
            "model_identity": part.identity,
            "options": json.loads(json.dumps(reuse_fields(cfg), default=str)),
            "run_key": part.key,
        },
        product_columns=PRODUCT_URI_COLUMNS,
        lease=part.lease,
        table=table_step(
            cfg.table,
            cfg.catalog,
            command,
            part.p.storage,
            clock,
            lambda outcome: {
                "vbatch.task": cfg.task,
                "vbatch.model-version": _model_version(outcome.table) or "",
                MODEL_IDENTITY: part.identity,
                OPTIONS: reuse_fields(cfg),
                OUT: out,
                "vbatch.rows": outcome.counts.rows,
                "vbatch.ok": outcome.counts.by_status.get("ok", 0),
                "vbatch.errors": outcome.counts.errors,
            },
        ),
    )
    record, outcome = finish(tail, clock, staged)
    counts = outcome.counts
    return JobSummary(
        task=cfg.task,
        rows=counts.rows,
        ok=counts.by_status.get("ok", 0),
        error=counts.errors,
        seconds=record["seconds"],
        results_uri=record["results_uri"],
        out=out,
        model_version=record["model_version"],
        resources=record["resources"],
        sample_errors=counts.sample_errors,
        record=record,
        resumed_rows=part.previous.rows,
        reused_rows=reused_rows,
    )


def _split_reused(
    ds: ray.data.Dataset,
    cfg: ImageJobConfig,
    info: ManifestInfo,
    storage: Storage,
    identity: str,
    cpu_stage: dict[str, Any],
    out: str,
) -> tuple[ray.data.Dataset, ray.data.Dataset | None, Previous | None]:
    """Give each manifest row its content fingerprint and split off the rows ``--reuse`` carries
    forward (:mod:`vbatch.operators.reuse`).

    Returns:
        (the rows to process, the rows to carry forward or ``None``, the earlier run's rows).
    """
    fp_column = fingerprint_column(info.passthrough)
    if cfg.reuse is None and fp_column is None:
        return ds, None, None
    previous: Previous | None = None
    listing = None
    if cfg.reuse is not None:
        # an Iceberg table's rows are exported into this run's staging (gone with it)
        scratch = join(out, STAGING, f"reuse-{uuid.uuid4().hex[:12]}")
        previous = previous_run(
            cfg.reuse, storage, identity, reuse_fields(cfg), catalog=cfg.catalog, scratch=scratch
        )
        if previous.reason:
            logger.warning("--reuse %s: nothing to reuse: %s", cfg.reuse, previous.reason)
        else:
            logger.info("--reuse %s: %d ok rows with a fingerprint", cfg.reuse, previous.rows)
        if fp_column is None:
            listing = list_fingerprints(manifest_uris(info.files, storage), info.base_uri, storage)
            logger.info(
                "content fingerprints: listed %d objects in %d folders",
                listing.objects,
                listing.folders,
            )
    ds = ds.map_batches(
        mark,  # type: ignore[arg-type]
        fn_kwargs={
            "fingerprint_column": fp_column,
            "listing": listing,
            "base_uri": info.base_uri,
            "storage": storage,
            "previous_keys": previous.keys if previous is not None else Previous("").keys,
        },
        **cpu_stage,
    )
    if previous is None or not previous.rows:
        return ds, None, previous
    # both branches read the marked manifest: mark it once
    ds = ds.materialize()
    split = {**cpu_stage, "udf_modifying_row_count": True}
    carried = ds.map_batches(keep, fn_kwargs={"reused": True}, **split)  # type: ignore[arg-type]
    todo = ds.map_batches(keep, fn_kwargs={"reused": False}, **split)  # type: ignore[arg-type]
    return todo, carried, previous


def _model_version(table: Any) -> str | None:
    """The distinct model versions of the rows (normally one), comma-joined."""
    if table is None:
        return None
    import pyarrow.compute as pc

    versions = pc.unique(table.column("model_version").drop_null()).to_pylist()
    return ", ".join(sorted(versions)) or None
