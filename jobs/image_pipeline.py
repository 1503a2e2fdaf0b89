"""The image pipeline every job that runs images through a model shares (``segment``, ``reid
embed``, ``reid search --manifest``): its configuration, and its stages on Ray Data::

    manifest rows → fetch bytes (CPU tasks, I/O threads) → decode + preprocess (CPU tasks)
    → the model (actor pool, one model per actor, GPU when present)
    → postprocess + write products (CPU tasks) → result rows

:func:`prepare_image_job` does the driver's part (resources, the checked model directory, the
manifest); each stage function adds its ``map_batches`` to a dataset. What a job does with the
result rows (stage, count, publish) is the job's (:mod:`vbatch.jobs.segment`, ``jobs.finish``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from vbatch.jobs.config import INPUT, MODEL, OUTPUT, PLACEMENT, RESULT, SELECTION, RunOptions, role
from vbatch.jobs.publish import FAULT_ENV, PARTITION
from vbatch.jobs.resume import fault_row, raise_from_row
from vbatch.jobs.runtime import (
    Resources,
    decide_resources,
    model_pool_stage,
    resolve_job_precision,
)
from vbatch.models import check_model_dir, load_transforms, model_entry
from vbatch.models.registry import ModelEntry
from vbatch.operators.columns import set_column
from vbatch.operators.defaults import DEFAULT_MAX_PIXELS
from vbatch.operators.images import decode_and_preprocess, fetch_bytes
from vbatch.operators.inference import ModelStage
from vbatch.operators.manifest import ManifestInfo, read_image_manifest
from vbatch.operators.outputs import OutputOptions, write_products
from vbatch.operators.storage import Storage

logger = logging.getLogger(__name__)

#: Rows per dataset block, the unit of work of the CPU stages: large enough to amortise a task's
#: overhead (~ms), small enough that a few hundred images spread over every worker.
ROWS_PER_BLOCK = 32


@dataclass(frozen=True)
class ImageJobConfig(RunOptions):
    """The per-image job (``vbatch segment``, ``vbatch reid embed``): one model over an image
    manifest. Frozen: a command derives its variant with :func:`dataclasses.replace`. Each field
    declares its role (:mod:`vbatch.jobs.config`): what decides results, what only says where."""

    task: str = role(RESULT)
    manifest: str = role(INPUT)
    model_dir: str = role(MODEL)
    out: str = role(OUTPUT)
    limit: int | None = role(SELECTION, None)
    max_pixels: int = role(RESULT, DEFAULT_MAX_PIXELS)
    #: matting: images with a longer side run downscaled to it (the model card's working range)
    max_side: int = role(RESULT, 2000)
    #: matting: composite cut-outs over this colour or image URI
    background: str | None = role(RESULT, None)
    #: "fp32", "bf16", "fp16", "auto" or None: the model's default (ModelEntry.default_precision);
    #: resolved to a precision before anything runs (jobs.runtime.resolve_job_precision)
    precision: str | None = role(RESULT, None)
    rows_per_block: int = role(PLACEMENT, ROWS_PER_BLOCK)
    #: "exact" (reference preprocessing), "fast" (DCT-scaled JPEG decode) or "gpu" (JPEGs decoded
    #: and resized in the model actor, operators.device_decode)
    decode: str = role(RESULT, "exact")
    #: masks: "full" (original size) or "model" (network resolution; results keep the original size)
    mask_size: str = role(RESULT, "full")
    #: an earlier run's --out: unchanged rows are carried forward from it (operators.reuse)
    reuse: str | None = role(OUTPUT, None)


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
    #: the job's configuration with its precision resolved (what decides its results)
    cfg: ImageJobConfig
    #: why that precision (``"bf16: CPU has AMX (amx_bf16)"``)
    precision_reason: str


def resolve_config(cfg: ImageJobConfig) -> tuple[ImageJobConfig, Resources, str]:
    """``cfg`` with its precision resolved (it decides results, so run keys hash this config),
    the actors' resources, and why that precision (after :func:`vbatch.jobs.runtime.ensure_ray`)."""
    res = decide_resources(
        cfg.task,
        cfg.batch_size,
        cfg.actors,
        cfg.gpus_per_actor,
        cfg.threads_per_actor,
        cfg.precision,
        cfg.device,
    )
    precision, reason = resolve_job_precision(cfg.task, cfg.precision, res, cfg.actor_resources)
    return dataclasses.replace(cfg, precision=precision), res, reason


def prepare_image_job(cfg: ImageJobConfig, storage: Storage) -> ImagePipeline:
    """Resources, the checked model directory, its transforms and the annotated manifest dataset
    (after :func:`vbatch.jobs.runtime.ensure_ray`). A wrong model directory fails here, in
    seconds, before any worker starts."""
    entry = model_entry(cfg.task)
    cfg, res, reason = resolve_config(cfg)
    logger.info("%s at %s", cfg.task, reason)
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
        entry,
        res,
        storage,
        local_model_dir,
        transforms,
        model_options,
        ds,
        info,
        cpu_stage,
        cfg,
        reason,
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
    return model_pool_stage(
        ds,
        ModelStage,
        {
            "task": cfg.task,
            "model_dir": cfg.model_dir if "://" in cfg.model_dir else str(p.local_model_dir),
            "storage_options": p.storage.options,
            "device": p.res.device,
            "threads": p.res.threads,
            "model_options": p.model_options,
        },
        p.res,
        cfg.actor_resources,
    )


def fault_stage(p: ImagePipeline, ds: ray.data.Dataset) -> ray.data.Dataset:
    """``VBATCH_FAULT=rows:<N>`` / ``hang:<N>`` (tests, benchmarks): a stage before the write
    stage that raises in (or blocks) the first batch holding manifest row N or later."""
    crash = fault_row(os.environ.get(FAULT_ENV))
    if crash is None:
        return ds
    return ds.map_batches(
        raise_from_row,  # type: ignore[arg-type]
        fn_kwargs={"row": crash[0], "hang": crash[1]},
        # its own stage holding no CPU: a blocked batch never keeps the others from being written
        **{**p.cpu_stage, "batch_size": None, "num_cpus": 0},
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
