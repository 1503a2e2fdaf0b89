"""``vbatch segment``: image manifest in, one product per image plus a results table out.

Stages (Ray Data, streaming)::

    read manifest (Ray, through the job's filesystem) → fetch bytes (CPU tasks, I/O threads)
    → decode + preprocess (CPU tasks) → model (actor pool, one model per actor, GPU when present)
    → postprocess + write products (CPU tasks) → results Parquet

Results are written to ``<out>/.staging/<run id>/`` and then moved to ``<out>/results/``
(replacing an earlier run's), so a repeated run never leaves duplicate rows. Every manifest row
comes out exactly once, ``ok`` or ``error``; the job checks that before it reports success.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import ray

from vbatch.jobs.publish import (
    new_run_id,
    read_table,
    report_details,
    write_and_publish,
    write_run_record,
)
from vbatch.jobs.runtime import Resources, decide_resources, ensure_ray
from vbatch.models import check_model_dir, load_transforms, model_entry
from vbatch.operators.decode import DEFAULT_MAX_PIXELS
from vbatch.operators.images import decode_and_preprocess, fetch_bytes
from vbatch.operators.inference import ModelStage
from vbatch.operators.manifest import read_image_manifest
from vbatch.operators.outputs import OutputOptions, write_products
from vbatch.operators.storage import Storage, StorageOptions, normalize, parent

logger = logging.getLogger(__name__)

#: Rows per dataset block, the unit of work of the CPU stages: large enough to amortise a task's
#: overhead (~ms), small enough that a few hundred images spread over every worker.
ROWS_PER_BLOCK = 32


@dataclass
class SegmentConfig:
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
    #: matting: images with a longer side run downscaled to it (the model card's working range)
    max_side: int = 2000
    #: matting: composite cut-outs over this colour or image URI
    background: str | None = None
    #: shop-seg on GPU: "fp32", "bf16" or "fp16"
    precision: str = "fp32"
    rows_per_block: int = ROWS_PER_BLOCK
    #: "exact" (reference preprocessing) or "fast" (DCT-scaled JPEG decode, area resize)
    decode: str = "exact"
    #: masks: "full" (original size) or "model" (network resolution; results keep the original size)
    mask_size: str = "full"


def task_options(cfg: SegmentConfig, res: Resources) -> tuple[dict[str, Any], dict[str, Any]]:
    """(options for ``load_model``, options for ``load_transforms``) of ``cfg.task``."""
    if cfg.task == "matting":
        # ONNX Runtime has its own thread pool: give it the actor's share of the cores
        return {"threads": res.threads, "max_side": cfg.max_side}, {"max_side": cfg.max_side}
    if cfg.task == "shop-seg":
        return {"precision": cfg.precision}, {}
    return {}, {}


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

    @property
    def images_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def report(self) -> str:
        headline = (
            f"{self.task}: {self.rows} rows — {self.ok} ok, {self.error} error — "
            f"{self.seconds:.1f} s, {self.images_per_second:.2f} images/s ({self.resources})"
        )
        details = report_details(
            self.results_uri, self.model_version, self.sample_errors, self.error
        )
        return "\n".join([headline, *details])


def run_segment(cfg: SegmentConfig) -> JobSummary:
    """Run the job; returns the summary. Raises on problems with the job as a whole (bad manifest
    columns, unreadable model directory), never on problems with single images."""
    started = time.perf_counter()
    entry = model_entry(cfg.task)
    if entry.output not in ("mask", "rgba", "embedding"):
        raise ValueError(
            f"--task {cfg.task} produces {entry.output}s; it has its own command (see vbatch --help)"
        )
    if cfg.mask_size != "full" and entry.output != "mask":
        raise ValueError(
            f"--mask-size {cfg.mask_size} is for mask tasks; {cfg.task} writes {entry.output}s"
        )
    storage = Storage(StorageOptions(endpoint_url=cfg.s3_endpoint))
    out = normalize(cfg.out)

    ensure_ray(cfg.address)
    res: Resources = decide_resources(
        cfg.task,
        cfg.batch_size,
        cfg.actors,
        cfg.gpus_per_actor,
        cfg.threads_per_actor,
        cfg.precision,
    )
    model_options, transform_options = task_options(cfg, res)
    # Checked on the driver before any worker starts: a wrong model directory fails in seconds.
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
    # (the type: ignores below: Ray's stub for map_batches does not model fn_kwargs)
    ds = ds.map_batches(
        fetch_bytes,  # type: ignore[arg-type]
        fn_kwargs={"storage": storage, "base_uri": info.base_uri},
        **cpu_stage,
    )
    ds = ds.map_batches(
        decode_and_preprocess,  # type: ignore[arg-type]
        fn_kwargs={
            "transforms": transforms,
            "max_pixels": cfg.max_pixels,
            "keep_bytes": entry.output == "rgba",
            "decode": cfg.decode,
        },
        **cpu_stage,
    )
    ds = ds.map_batches(
        ModelStage,
        fn_constructor_kwargs={
            "task": cfg.task,
            "model_dir": cfg.model_dir if "://" in cfg.model_dir else str(local_model_dir),
            "storage_options": storage.options,
            "device": res.device,
            "threads": res.threads,
            "model_options": model_options,
        },
        compute=ray.data.ActorPoolStrategy(size=res.actors),
        batch_size=res.batch_size,
        batch_format="pyarrow",
        num_gpus=res.gpus_per_actor or None,
        # one logical CPU: the actor's torch threads use the cores; CPU stages still get scheduled
        num_cpus=1,
        # the replica's host memory. Because it differs from the CPU stages' resources, Ray also
        # never fuses decoding into the actor (it would on a CPU-only cluster): decoding overlaps
        # with inference instead of waiting for it.
        memory=res.memory,
        udf_modifying_row_count=False,
    )
    options = OutputOptions(
        out_uri=out,
        task=cfg.task,
        output=entry.output,
        background=cfg.background,
        embedding_dim=getattr(transforms, "embed_dim", None),
        mask_size=cfg.mask_size,
    )
    ds = ds.map_batches(
        write_products,  # type: ignore[arg-type]
        fn_kwargs={"transforms": transforms, "options": options, "storage": storage},
        # its blocks are the model's batches already
        **{**cpu_stage, "batch_size": None},
    )

    run_id = new_run_id()
    results = write_and_publish(ds, out, storage, run_id)

    summary = summarize(
        storage, results, cfg.task, info.num_rows, time.perf_counter() - started, res
    )
    write_run_record(out, storage, run_id, cfg, summary, info.files)
    return summary


def summarize(
    storage: Storage, results: str, task: str, expected_rows: int, seconds: float, res: Resources
) -> JobSummary:
    """Read the written results back and check the accounting: one row per manifest row."""
    table = read_table(results, storage, ["image_id", "status", "error", "model_version"])
    status = table.column("status").to_pylist()
    ok = sum(s == "ok" for s in status)
    if table.num_rows != expected_rows:
        raise RuntimeError(
            f"accounting error: the manifest has {expected_rows} rows but {results} has {table.num_rows}"
        )
    errors = [
        (i, e)
        for i, s, e in zip(
            table.column("image_id").to_pylist(),
            status,
            table.column("error").to_pylist(),
            strict=True,
        )
        if s != "ok"
    ]
    versions = {v for v in table.column("model_version").to_pylist() if v}
    return JobSummary(
        task=task,
        rows=table.num_rows,
        ok=ok,
        error=table.num_rows - ok,
        seconds=seconds,
        results_uri=results,
        out=parent(results),
        model_version=", ".join(sorted(versions)) or None,
        resources=res.describe(),
        sample_errors=errors[:5],
    )
