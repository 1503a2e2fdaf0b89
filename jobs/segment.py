"""``vbatch segment``: image manifest in, one product per image plus a results table out.

Stages (Ray Data, streaming)::

    read manifest (Ray, through the job's filesystem) → fetch bytes (CPU tasks, I/O threads)
    → decode + preprocess (CPU tasks) → model (actor pool, one model per actor, GPU when present)
    → postprocess + write products (CPU tasks) → results Parquet

The same job serves every per-image model (``segment``'s tasks and ``reid embed``), configured by
:class:`ImageJobConfig`. Results are staged under ``<out>/.staging/<run key>/`` (a rerun after a
crash resumes from there: :mod:`vbatch.jobs.resume`), counted, and
committed as a new generation of ``<out>/results/`` (:mod:`vbatch.jobs.publish`), so a repeated run
never leaves duplicate rows and readers never see a partial table. Every manifest row comes out
exactly once, ``ok`` or ``error``; the job checks that before it publishes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from vbatch.jobs.publish import (
    FAULT_ENV,
    PARTITION,
    publish,
    read_files,
    report_details,
    stage,
    stage_partitions,
    write_run_record,
)
from vbatch.jobs.resume import (
    drop_done,
    fault_row,
    file_fingerprints,
    model_dir_fingerprint,
    previous_attempt,
    raise_from_row,
    run_key,
)
from vbatch.jobs.runtime import (
    Resources,
    actor_resources,
    decide_resources,
    ensure_ray,
    refuse_local_paths_on_cluster,
)
from vbatch.jobs.summary import (
    DEFAULT_MAX_ERROR_RATE,
    DEFAULT_MAX_INFRA_ERROR_RATE,
    Counts,
    JobFailed,
    Limits,
    RunClock,
    check_infrastructure,
    count_rows,
    job_record,
)
from vbatch.models import check_model_dir, load_transforms, model_entry
from vbatch.models import model_version as weights_version
from vbatch.models.registry import ModelEntry
from vbatch.operators.columns import set_column
from vbatch.operators.decode import DEFAULT_MAX_PIXELS
from vbatch.operators.images import decode_and_preprocess, fetch_bytes
from vbatch.operators.inference import ModelStage
from vbatch.operators.manifest import ManifestInfo, read_image_manifest
from vbatch.operators.outputs import OutputOptions, write_products
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

logger = logging.getLogger(__name__)

#: Rows per dataset block, the unit of work of the CPU stages: large enough to amortise a task's
#: overhead (~ms), small enough that a few hundred images spread over every worker.
ROWS_PER_BLOCK = 32


@dataclass(frozen=True)
class ImageJobConfig:
    """The per-image job (``vbatch segment``, ``vbatch reid embed``): one model over an image
    manifest. Frozen: a command derives its variant with :func:`dataclasses.replace`."""

    task: str
    manifest: str
    model_dir: str
    out: str
    batch_size: int | None = None
    actors: int | None = None
    gpus_per_actor: float | None = None
    threads_per_actor: int | None = None
    limit: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    s3_endpoint: str | None = None
    address: str | None = None
    #: pass the driver's AWS_* variables to the job's workers (runtime_env); off: never silent
    forward_s3_env: bool = False
    #: custom Ray resources each model actor requests, e.g. {"gpu_node": 1}: pins the actors to
    #: the nodes that carry them
    actor_resources: dict[str, float] | None = None
    #: "auto" (GPUs when the cluster has or can get them), "cpu" or "cuda"
    device: str = "auto"
    #: matting: images with a longer side run downscaled to it (the model card's working range)
    max_side: int = 2000
    #: matting: composite cut-outs over this colour or image URI
    background: str | None = None
    #: shop-seg on GPU: "fp32", "bf16" or "fp16"
    precision: str = "fp32"
    rows_per_block: int = ROWS_PER_BLOCK
    #: exit 3 above this fraction of error rows (jobs.summary)
    max_error_rate: float = DEFAULT_MAX_ERROR_RATE
    #: fail, publishing nothing, above this fraction of infrastructure error rows
    max_infra_error_rate: float = DEFAULT_MAX_INFRA_ERROR_RATE
    #: "exact" (reference preprocessing), "fast" (DCT-scaled JPEG decode) or "gpu" (JPEGs decoded
    #: and resized in the model actor, operators.device_decode)
    decode: str = "exact"
    #: masks: "full" (original size) or "model" (network resolution; results keep the original size)
    mask_size: str = "full"
    #: an earlier run's --out: unchanged rows are carried forward from it (operators.reuse)
    reuse: str | None = None


def task_options(
    entry: ModelEntry, cfg: Any, res: Resources
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(options for ``load_model``, options for ``load_transforms``): the option names the
    registry entry declares, valued from the job's configuration ``cfg`` (a dataclass) and the
    actor's resources (``threads``)."""
    values = {**asdict(cfg), "threads": res.threads}
    missing = sorted(set(entry.options + entry.transform_options) - set(values))
    if missing:
        raise ValueError(f"{entry.module} declares options the job does not have: {missing}")
    return (
        {k: values[k] for k in entry.options},
        {k: values[k] for k in entry.transform_options},
    )


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
    storage = Storage(StorageOptions(endpoint_url=cfg.s3_endpoint))
    ensure_ray(cfg.address, forward_s3_env=cfg.forward_s3_env)
    part = _plan(cfg, storage)
    ds = model_stages(part.p, cfg, part.ds)
    crash = fault_row(os.environ.get(FAULT_ENV))
    if crash is not None:
        ds = ds.map_batches(
            raise_from_row,  # type: ignore[arg-type]
            fn_kwargs={"row": crash[0], "hang": crash[1]},
            **{**part.p.cpu_stage, "batch_size": None},
        )
    ds = write_stage(part.p, ds, part.options)
    carried = _carried(part)
    if carried is not None:
        ds = ds.union(carried)
    staged = stage(ds, part.out, storage, part.key)
    return _finish(part, clock, command or "segment", staged)


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
        if dataclasses.replace(c, **_OWN_FIELDS(first)) != first:
            raise PoolMismatch(
                "one actor pool needs one model configuration: these jobs differ in more than "
                "--manifest, --out, --reuse and --limit"
            )
    storage = Storage(StorageOptions(endpoint_url=first.s3_endpoint))
    ensure_ray(first.address, forward_s3_env=first.forward_s3_env)
    results: list[JobSummary | Exception | None] = [None] * len(cfgs)
    parts: dict[int, _Partition] = {}
    for i, c in enumerate(cfgs):
        try:
            parts[i] = _plan(c, storage)
        except Exception as e:  # this job's manifest or output: it fails alone
            results[i] = e
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
                results[i] = _finish(part, clocks[i], command or "segment", staged[i])
            except Exception as e:
                results[i] = e
    return [r if r is not None else RuntimeError("not run") for r in results]


class PoolMismatch(ValueError):
    """Jobs that cannot share one actor pool (another model, other model options)."""


def _OWN_FIELDS(cfg: ImageJobConfig) -> dict[str, Any]:
    """The fields a job of a shared pool keeps for itself (:func:`run_image_jobs`)."""
    return {"manifest": cfg.manifest, "out": cfg.out, "reuse": cfg.reuse, "limit": cfg.limit}


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


def _plan(cfg: ImageJobConfig, storage: Storage) -> _Partition:
    """Check the job, read its manifest, find what a crashed attempt staged and what ``--reuse``
    carries forward (after :func:`vbatch.jobs.runtime.ensure_ray`)."""
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
    p = prepare_image_job(cfg, storage)
    # staged under a key of what decides the results: the rerun of a crashed run finds its files
    # and skips their rows before anything is fetched (jobs.resume)
    key = run_key(
        asdict(cfg),
        file_fingerprints(list(p.info.files), storage),
        model_dir_fingerprint(p.local_model_dir),
    )
    previous = previous_attempt(out, storage, key)
    ds = p.ds
    if previous.rows:
        ds = ds.map_batches(
            drop_done,  # type: ignore[arg-type]
            fn_kwargs={"done_ids": previous.done_ids, "done_rows": previous.done_rows},
            **{**p.cpu_stage, "udf_modifying_row_count": True},
        )
    identity = model_identity(weights_version(cfg.task, p.local_model_dir), p.local_model_dir)
    ds, carried, reusable = _split_reused(ds, cfg, p.info, storage, identity, p.cpu_stage)
    options = output_options(p, cfg, out)
    return _Partition(cfg, out, p, key, previous, identity, ds, carried, reusable, options)


def _carried(part: _Partition) -> ray.data.Dataset | None:
    """The result rows of the rows ``--reuse`` carries forward (products copied into ``out``)."""
    if part.carried is None or part.reusable is None:
        return None
    return part.carried.map_batches(
        carry_forward,  # type: ignore[arg-type]
        fn_kwargs={
            "previous": part.reusable,
            "out": part.out,
            "task": part.cfg.task,
            "output": part.p.entry.output,
            "embedding_dim": part.options.embedding_dim,
            "storage": part.p.storage,
        },
        **part.p.cpu_stage,
    )


def _finish(part: _Partition, clock: RunClock, command: str, staged: list[str]) -> JobSummary:
    """Count the staged rows, check them, publish, write run.json; the job's summary."""
    cfg, out, storage, info = part.cfg, part.out, part.p.storage, part.p.info
    # counted on the staged files, before anything is published: a job that fails its checks
    # leaves the previous table committed
    columns = ["image_id", "status", "error", "error_class", "model_version"]
    table = read_files(staged, storage, columns) if staged else None
    counts = count_rows(table, "image_id") if table is not None else Counts(0, {}, {}, [])
    if counts.rows != info.num_rows:
        raise JobFailed(
            f"accounting error: the manifest has {info.num_rows} rows but the results have "
            f"{counts.rows}"
        )
    limits = Limits(cfg.max_error_rate, cfg.max_infra_error_rate)
    check_infrastructure(counts, limits, "images")
    generation = publish(out, storage, clock.run_id, staged, counts.rows, staging_name=part.key)
    model_version = _model_version(table)
    reused_rows = (
        part.carried.count() if part.carried is not None and part.reusable is not None else 0
    )

    summary = JobSummary(
        task=cfg.task,
        rows=counts.rows,
        ok=counts.by_status.get("ok", 0),
        error=counts.errors,
        seconds=clock.seconds(),
        results_uri=join(out, "results"),
        out=out,
        model_version=model_version,
        resources=part.p.res.describe(),
        sample_errors=counts.sample_errors,
        resumed_rows=part.previous.rows,
        reused_rows=reused_rows,
    )
    summary.record = job_record(
        command,
        clock,
        counts,
        limits,
        task=cfg.task,
        model_version=model_version,
        images_per_second=summary.images_per_second,
        out=out,
        results_uri=summary.results_uri,
        generation=generation,
        resources=part.p.res.describe(),
        # rows an earlier, crashed attempt of this run had staged: not fetched or inferred again
        resumed_rows=part.previous.rows,
        # rows carried forward from --reuse: not fetched or inferred either
        reused_rows=reused_rows,
    )
    write_run_record(
        out,
        storage,
        {
            **summary.record,
            "config": asdict(cfg),
            "manifest_files": info.files,
            # what a later --reuse of this run compares (operators.reuse)
            "model_identity": part.identity,
        },
    )
    return summary


@dataclass
class ImagePipeline:
    """An image job's pieces prepared on the driver (:func:`prepare_image_job`): what its stages
    need, shared by every job that runs images through a model (``segment``, ``reid embed``,
    ``reid search --manifest``)."""

    entry: ModelEntry
    res: Resources
    storage: Storage
    local_model_dir: Path
    transforms: Any
    model_options: dict[str, Any]
    ds: ray.data.Dataset
    info: ManifestInfo
    #: the CPU stages' map_batches arguments
    cpu_stage: dict[str, Any]


def prepare_image_job(cfg: ImageJobConfig, storage: Storage) -> ImagePipeline:
    """Resources, the checked model directory, its transforms and the annotated manifest dataset
    (after :func:`vbatch.jobs.runtime.ensure_ray`). A wrong model directory fails here, in
    seconds, before any worker starts."""
    entry = model_entry(cfg.task)
    res = decide_resources(
        cfg.task,
        cfg.batch_size,
        cfg.actors,
        cfg.gpus_per_actor,
        cfg.threads_per_actor,
        cfg.precision,
        cfg.device,
    )
    model_options, transform_options = task_options(entry, cfg, res)
    local_model_dir = storage.localize_dir(cfg.model_dir)
    check_model_dir(cfg.task, local_model_dir)
    transforms = load_transforms(cfg.task, local_model_dir, **transform_options)
    if cfg.task == "matting":  # a graph not yet converted: say so here, not from every actor
        from vbatch.models.matting.model import resolve_onnx

        resolve_onnx(local_model_dir)
    ds, info = read_image_manifest(
        cfg.manifest, storage, entry.output, cfg.limit, cfg.rows_per_block
    )
    logger.info(
        "manifest %s: %d rows (%d bad), %s",
        info.uri,
        info.num_rows,
        info.num_bad_rows,
        res.describe(),
    )

    cpu_stage: dict[str, Any] = {
        "batch_format": "pyarrow",
        # a block of a large manifest holds more rows (see operators.manifest): work through it
        # this many images at a time
        "batch_size": cfg.rows_per_block,
        "udf_modifying_row_count": False,
    }
    return ImagePipeline(
        entry, res, storage, local_model_dir, transforms, model_options, ds, info, cpu_stage
    )


def model_stages(p: ImagePipeline, cfg: ImageJobConfig, ds: ray.data.Dataset) -> ray.data.Dataset:
    """fetch → decode + preprocess → the model's actor pool, over manifest rows ``ds``."""
    return model_stage(p, cfg, cpu_stages(p, cfg, ds))


def cpu_stages(p: ImagePipeline, cfg: ImageJobConfig, ds: ray.data.Dataset) -> ray.data.Dataset:
    """fetch → decode + preprocess (CPU tasks), over manifest rows ``ds``."""
    # (the type: ignores below: Ray's stub for map_batches does not model fn_kwargs)
    ds = ds.map_batches(
        fetch_bytes,  # type: ignore[arg-type]
        fn_kwargs={"storage": p.storage, "base_uri": p.info.base_uri},
        **p.cpu_stage,
    )
    return ds.map_batches(
        decode_and_preprocess,  # type: ignore[arg-type]
        fn_kwargs={
            "transforms": p.transforms,
            "max_pixels": cfg.max_pixels,
            "keep_bytes": p.entry.output == "rgba",
            "decode": cfg.decode,
        },
        **p.cpu_stage,
    )


def model_stage(p: ImagePipeline, cfg: ImageJobConfig, ds: ray.data.Dataset) -> ray.data.Dataset:
    """The model's actor pool over decoded rows ``ds``."""
    storage, res = p.storage, p.res
    return ds.map_batches(
        ModelStage,
        fn_constructor_kwargs={
            "task": cfg.task,
            "model_dir": cfg.model_dir if "://" in cfg.model_dir else str(p.local_model_dir),
            "storage_options": storage.options,
            "device": res.device,
            "threads": res.threads,
            "model_options": p.model_options,
        },
        compute=ray.data.ActorPoolStrategy(min_size=res.pool_size()[0], max_size=res.actors),
        batch_size=res.batch_size,
        batch_format="pyarrow",
        num_gpus=res.gpus_per_actor or None,
        # one logical CPU: the actor's torch threads use the cores; CPU stages still get scheduled
        num_cpus=1,
        # the replica's host memory. Because it differs from the CPU stages' resources, Ray also
        # never fuses decoding into the actor (it would on a CPU-only cluster): decoding overlaps
        # with inference instead of waiting for it.
        memory=res.memory,
        # custom resources pin the actors to the nodes that carry them (a node type's label)
        **actor_resources(cfg.actor_resources),
        udf_modifying_row_count=False,
    )


def output_options(p: ImagePipeline, cfg: ImageJobConfig, out: str) -> OutputOptions:
    return OutputOptions(
        out_uri=out,
        task=cfg.task,
        output=p.entry.output,
        background=cfg.background,
        embedding_dim=getattr(p.transforms, "embed_dim", None),
        mask_size=cfg.mask_size,
        base_uri=p.info.base_uri,
    )


def write_stage(p: ImagePipeline, ds: ray.data.Dataset, options: OutputOptions) -> ray.data.Dataset:
    """Postprocess and write each row's products; the result rows."""
    return ds.map_batches(
        write_products,  # type: ignore[arg-type]
        fn_kwargs={"transforms": p.transforms, "options": options, "storage": p.storage},
        # its blocks are the model's batches already
        **{**p.cpu_stage, "batch_size": None},
    )


def tag_partition(batch: pa.Table, partition: int) -> pa.Table:
    """Mark rows with their job's number."""
    return set_column(batch, PARTITION, pa.array(np.full(batch.num_rows, partition, np.int32)))


def write_partitioned(
    batch: pa.Table,
    *,
    transforms: Any,
    options: dict[int, OutputOptions],
    storage: Storage,
) -> pa.Table:
    """:func:`vbatch.operators.outputs.write_products` for rows of several jobs: each job's rows
    with its own options (``--out``, manifest folder); the rows keep their job's number."""
    parts = []
    numbers = batch.column(PARTITION).to_numpy()
    for number in np.unique(numbers):
        rows = batch.filter(pa.array(numbers == number))
        written = write_products(
            rows, transforms=transforms, options=options[int(number)], storage=storage
        )
        parts.append(tag_partition(written, int(number)))
    return pa.concat_tables(parts, promote_options="permissive")


def _split_reused(
    ds: ray.data.Dataset,
    cfg: ImageJobConfig,
    info: ManifestInfo,
    storage: Storage,
    identity: str,
    cpu_stage: dict[str, Any],
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
        previous = previous_run(cfg.reuse, storage, identity, asdict(cfg))
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
