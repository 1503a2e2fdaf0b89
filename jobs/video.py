"""``vbatch video``: referring video object segmentation (MTTR) over a video manifest, streamed.

Stages (Ray Data, streaming; see :mod:`vbatch.operators.video` for why each is where it is)::

    read manifest (driver, one row per video) → plan (CPU task per video: probe, one row per
    window) → decode one window (CPU task per window) → model (actor pool, one forward per window
    for all queries) → write the frames each window owns (CPU task per window) → results Parquet

Memory is bounded by a window (24 frames) in every stage, whatever the video's length. Outputs:
``<out>/frames/<video_id>/<query_index>/<frame_index>.png`` (0/255 masks at the original size),
``<out>/results/`` (one row per video, query and frame; staged, counted and committed as a new
generation like ``vbatch segment``'s, :mod:`vbatch.jobs.publish`), ``<out>/renders/<video_id>.mp4``
with ``--render``, and ``run.json`` (the summary of :mod:`vbatch.jobs.summary`). Results are staged
under ``<out>/.staging/<run key>/``: the rerun of a crashed run skips the windows whose rows are
staged (:mod:`vbatch.jobs.video_resume`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray

from vbatch.jobs.config import (
    INPUT,
    MODEL,
    OUTPUT,
    RESULT,
    SELECTION,
    RunOptions,
    key_fields,
    reuse_fields,
    role,
)
from vbatch.jobs.finish import Outcome, Tail, finish
from vbatch.jobs.image_pipeline import task_options
from vbatch.jobs.lakehouse import check_table, table_step, target_of
from vbatch.jobs.lease import Lease
from vbatch.jobs.limits import Limits
from vbatch.jobs.publish import FAULT_ENV, read_files, report_details, stage
from vbatch.jobs.resume import file_fingerprints, run_key
from vbatch.jobs.runtime import (
    Resources,
    decide_resources,
    ensure_ray,
    model_pool_stage,
    refuse_local_paths_on_cluster,
    releases_actors,
    resolve_job_precision,
)
from vbatch.jobs.summary import Counts, JobFailed, RunClock, count_rows
from vbatch.jobs.video_resume import (
    drop_done_windows,
    drop_failed_videos,
    drop_staged_rows,
    fault_window,
    previous_video_attempt,
    stop_from_window,
)
from vbatch.models import check_model_dir, model_entry
from vbatch.models import model_version as weights_version
from vbatch.operators.lakehouse.catalog import MODEL_IDENTITY, OPTIONS, OUT
from vbatch.operators.reuse import model_identity
from vbatch.operators.storage import Storage, StorageOptions, join, normalize
from vbatch.operators.tables import product_root
from vbatch.operators.video.decode import decode_windows
from vbatch.operators.video.manifest import read_video_manifest
from vbatch.operators.video.model_stage import WindowModelStage
from vbatch.operators.video.plan import plan_video_windows
from vbatch.operators.video.queries import rvos_query_check
from vbatch.operators.video.render import render_video
from vbatch.operators.video.write import write_window_masks
from vbatch.schemas.images import PRODUCT_URI_COLUMNS
from vbatch.schemas.videos import video_results_schema

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VideoConfig(RunOptions):
    """The video job. Each field declares its role (:mod:`vbatch.jobs.config`); ``batch_size``
    is windows per model call (default: the rvos entry's, one window of 24 frames)."""

    manifest: str = role(INPUT)
    model_dir: str = role(MODEL)
    out: str = role(OUTPUT)
    limit: int | None = role(SELECTION, None)
    #: renders are drawn after publishing, from the table: they change no result row
    render: bool = role(OUTPUT, False)
    #: "fp32" (the reference's), "bf16", "fp16", "auto" or None (the model's default, fp32):
    #: resolved before anything runs (jobs.runtime.resolve_job_precision)
    precision: str | None = role(RESULT, None)


@dataclass
class VideoSummary:
    videos: int
    videos_ok: int
    videos_error: int
    #: frames with a mask for every valid query
    frames: int
    #: result rows: ok (one mask each) and error
    rows_ok: int
    rows_error: int
    seconds: float
    results_uri: str
    out: str
    model_version: str | None
    resources: str
    renders: int
    #: a few (video_id, error) pairs to show
    sample_errors: list[tuple[str | None, str]]
    #: the machine-readable summary (jobs.summary.job_record), also in <out>/run.json
    record: dict[str, Any] = field(default_factory=dict)
    #: result rows by status and error class
    counts: Counts = field(default_factory=lambda: Counts(0, {}, {}, []))
    #: result rows taken from the staged files of a crashed attempt of the same run (their
    #: windows were not decoded or inferred again: jobs.video_resume)
    resumed_rows: int = 0

    @property
    def frames_per_second(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        return int(self.record.get("exit_code", 0))

    def report(self) -> str:
        headline = (
            f"rvos: {self.videos} videos — {self.videos_ok} ok, {self.videos_error} with errors — "
            f"{self.frames} frames, {self.rows_ok} masks — {self.seconds:.1f} s, "
            f"{self.frames_per_second:.2f} frames/s ({self.resources})"
        )
        extra: tuple[str, ...] = ()
        if self.resumed_rows:
            extra += (
                f"resumed: {self.resumed_rows} rows staged by an unfinished earlier attempt "
                "(their windows not decoded or inferred again)",
            )
        if self.renders:
            extra += (f"renders: {self.renders} under {join(self.out, 'renders')}",)
        details = report_details(
            self.results_uri, self.model_version, self.sample_errors, self.rows_error, extra=extra
        )
        return "\n".join([headline, *details])


@releases_actors
def run_video(cfg: VideoConfig, clock: RunClock | None = None) -> VideoSummary:
    """Run the job; returns the summary. Raises on problems with the job as a whole (bad manifest
    columns, unreadable model directory, too many infrastructure errors), never on problems with
    single videos, queries or frames; nothing new is published then.

    Args:
        clock: the run's id and start time (the CLI's, so that its summary and run.json agree).
    """
    clock = clock or RunClock()
    plan = _plan(cfg, clock)
    cfg = plan.cfg  # the precision resolved
    with plan.lease:
        staged = stage(_stages(cfg, plan, clock), plan.out, plan.storage, plan.key)
        record, outcome = finish(_tail(cfg, plan, clock), clock, staged)
    outcome.details.record = record
    return outcome.details


@dataclass
class _VideoPlan:
    """The job prepared on the driver: what its stages need, its staging key, what a crashed
    attempt staged."""

    storage: Storage
    out: str
    res: Resources
    local_model_dir: Any
    ds: ray.data.Dataset
    info: Any  # operators.video.manifest.VideoManifestInfo
    key: str
    previous: Any  # jobs.video_resume.VideoAttempt
    identity: str
    lease: Lease
    #: the configuration with its precision resolved, and why that precision
    cfg: VideoConfig
    precision_reason: str


def _plan(cfg: VideoConfig, clock: RunClock) -> _VideoPlan:
    """The lease on ``--out``, then :func:`_plan_leased` (the lease is released if that fails)."""
    storage = Storage(StorageOptions(endpoint_url=cfg.s3_endpoint))
    out = normalize(cfg.out)
    ensure_ray(cfg.address, forward_s3_env=cfg.forward_s3_env)
    refuse_local_paths_on_cluster(
        {"--manifest": cfg.manifest, "--model-dir": cfg.model_dir, "--out": cfg.out}
    )
    lease = Lease(out, storage, clock.run_id, "video", cfg.break_lease)
    lease.__enter__()
    try:
        return _plan_leased(cfg, storage, out, lease)
    except BaseException:
        lease.release()
        raise


def _plan_leased(cfg: VideoConfig, storage: Storage, out: str, lease: Lease) -> _VideoPlan:
    """Resources, the checked model directory, the manifest, the run key and the crashed attempt."""
    res = decide_resources(
        "rvos",
        cfg.batch_size,
        cfg.actors,
        cfg.gpus_per_actor,
        cfg.threads_per_actor,
        device=cfg.device,
    )
    precision, reason = resolve_job_precision("rvos", cfg.precision, res, cfg.actor_resources)
    cfg = replace(cfg, precision=precision)
    logger.info("rvos at %s", reason)
    # checked on the driver before any worker starts: a wrong model directory fails in seconds
    local_model_dir = storage.localize_dir(cfg.model_dir)
    check_model_dir("rvos", local_model_dir)
    # queries the text encoder cannot take fail alone, here, not every query of their video later
    query_check = rvos_query_check(local_model_dir)
    ds, info = read_video_manifest(cfg.manifest, storage, cfg.limit, query_check=query_check)
    logger.info(
        "manifest %s: %d videos (%d bad), %d queries, %s",
        info.uri,
        info.num_rows,
        info.num_bad_rows,
        info.num_queries,
        res.describe(),
    )
    # staged under a key of what decides the results: the rerun of a crashed run finds its files
    # and skips the videos and windows whose rows are there (jobs.video_resume); the model by its
    # content, as the image jobs' key (jobs.segment.image_run_key)
    identity = model_identity(weights_version("rvos", local_model_dir), local_model_dir)
    key = run_key(key_fields(cfg), file_fingerprints(list(info.files), storage), [identity])
    previous = previous_video_attempt(out, storage, key)
    # an Iceberg table that cannot take the results fails the job here, before any work
    check_table(target_of(cfg.table, cfg.catalog), "video", video_results_schema(info.has_gt))
    return _VideoPlan(
        storage, out, res, local_model_dir, ds, info, key, previous, identity, lease, cfg, reason
    )


def _stages(cfg: VideoConfig, plan: _VideoPlan, clock: RunClock) -> ray.data.Dataset:
    """plan windows → decode → model → write masks, skipping what a crashed attempt staged."""
    storage, previous = plan.storage, plan.previous
    cpu_stage: dict[str, Any] = {"batch_format": "pyarrow", "udf_modifying_row_count": False}
    filtering: dict[str, Any] = {**cpu_stage, "batch_size": None, "udf_modifying_row_count": True}
    ds = plan.ds
    # (the type: ignores below: Ray's stub for map_batches does not model fn_kwargs)
    if previous.rows:  # failed videos staged: not fetched or probed again
        ds = ds.map_batches(
            drop_failed_videos,  # type: ignore[arg-type]
            fn_kwargs={"staged": previous.staged},
            **filtering,
        )
    ds = ds.map_batches(
        plan_video_windows,  # type: ignore[arg-type]
        fn_kwargs={"storage": storage, "base_uri": plan.info.base_uri},
        batch_format="pyarrow",
        batch_size=None,
        udf_modifying_row_count=True,
    )
    if previous.rows:  # windows staged: not decoded or inferred again
        ds = ds.map_batches(
            drop_done_windows,  # type: ignore[arg-type]
            fn_kwargs={"staged": previous.staged},
            **filtering,
        )
    # one window per block: a long video's windows spread over every worker, and each decode task
    # holds one window's frames
    ds = ds.repartition(target_num_rows_per_block=1)
    ds = ds.map_batches(
        decode_windows,  # type: ignore[arg-type]
        fn_kwargs={"storage": storage},
        batch_size=1,
        **cpu_stage,
    )
    model_dir = cfg.model_dir if "://" in cfg.model_dir else str(plan.local_model_dir)
    ds = model_pool_stage(
        ds,
        WindowModelStage,
        {
            "model_dir": model_dir,
            "storage_options": storage.options,
            "device": plan.res.device,
            "threads": plan.res.threads,
            "model_options": task_options(model_entry("rvos"), cfg, plan.res)[0],
        },
        plan.res,
        cfg.actor_resources,
    )
    crash = fault_window(os.environ.get(FAULT_ENV))
    if crash is not None:
        ds = ds.map_batches(
            stop_from_window,  # type: ignore[arg-type]
            fn_kwargs={"row": crash[0], "window": crash[1], "hang": crash[2]},
            # its own stage holding no CPU: blocked batches never keep the other batches from
            # being written (on a 2-CPU node two blocked tasks held every CPU, nothing was staged)
            **{**cpu_stage, "batch_size": None, "num_cpus": 0},
        )
    ds = ds.map_batches(
        write_window_masks,  # type: ignore[arg-type]
        fn_kwargs={
            # this run's own product folder: no other run writes there
            "out_uri": product_root(plan.out, clock.run_id),
            "storage": storage,
            "gt": plan.info.has_gt,
            "base_uri": plan.info.base_uri,
        },
        batch_format="pyarrow",
        batch_size=None,
        udf_modifying_row_count=True,
    )
    if previous.rows:  # a window a lost file held in part is completed, never duplicated
        ds = ds.map_batches(
            drop_staged_rows,  # type: ignore[arg-type]
            fn_kwargs={"staged": previous.staged},
            **filtering,
        )
    return ds


def _tail(cfg: VideoConfig, plan: _VideoPlan, clock: RunClock) -> Tail:
    """How the video job finishes: its accounting (every video has rows, no frame twice), its
    renders after the commit, its summary's facts."""
    out, storage, info = plan.out, plan.storage, plan.info

    def account(staged: list[str]) -> Outcome:
        # counted and checked on the staged files: a failed check publishes nothing
        table = read_files(staged, storage) if staged else None
        if table is None:
            raise JobFailed(
                f"accounting error: the job wrote no result rows for {info.num_rows} videos"
            )
        summary = summarize(table, info.num_rows, join(out, "results"), clock.seconds(), plan.res)
        summary.resumed_rows = plan.previous.rows
        return Outcome(summary.counts, table.num_rows, table, summary)

    def after_publish(outcome: Outcome) -> None:
        if cfg.render:
            outcome.details.renders = render_all(outcome.table, out, storage)

    def facts(outcome: Outcome, generation: str) -> dict[str, Any]:
        s = outcome.details
        s.seconds = clock.seconds()
        return {
            "task": "rvos",
            "model_version": s.model_version,
            "videos": s.videos,
            "videos_ok": s.videos_ok,
            "frames": s.frames,
            "frames_per_second": s.frames_per_second,
            "renders": s.renders,
            "out": out,
            "results_uri": s.results_uri,
            "generation": generation,
            "resources": plan.res.describe(),
            "precision": cfg.precision,
            "precision_reason": plan.precision_reason,
            # rows an earlier, crashed attempt of this run had staged: their windows not redone
            "resumed_rows": plan.previous.rows,
        }

    return Tail(
        command="video",
        out=out,
        storage=storage,
        limits=Limits(cfg.max_error_rate, cfg.max_infra_error_rate),
        what="result rows",
        account=account,
        facts=facts,
        staging_key=plan.key,
        run_extra={"config": asdict(cfg), "manifest_files": info.files, "run_key": plan.key},
        after_publish=after_publish,
        commit={
            "task": "rvos",
            "model_identity": plan.identity,
            "options": json.loads(json.dumps(reuse_fields(cfg), default=str)),
            "run_key": plan.key,
        },
        product_columns=PRODUCT_URI_COLUMNS,
        lease=plan.lease,
        table=table_step(
            cfg.table,
            cfg.catalog,
            "video",
            storage,
            clock,
            lambda outcome: {
                "vbatch.task": "rvos",
                "vbatch.model-version": outcome.details.model_version or "",
                MODEL_IDENTITY: plan.identity,
                OPTIONS: reuse_fields(cfg),
                OUT: out,
                "vbatch.rows": outcome.counts.rows,
                "vbatch.videos": outcome.details.videos,
                "vbatch.videos-ok": outcome.details.videos_ok,
            },
        ),
    )


def summarize(
    table: pa.Table,
    manifest_rows: int,
    results: str,
    seconds: float,
    res: Resources,
    renders: int = 0,
) -> VideoSummary:
    """Check the accounting and count, with Arrow compute (no Python object per row): every
    manifest row has rows, no (video, query, frame) twice."""
    rows = table.column("manifest_row")
    seen = pc.unique(rows.drop_null())
    in_range = pc.and_(pc.greater_equal(seen, 0), pc.less(seen, manifest_rows))
    if pc.sum(in_range).as_py() != manifest_rows:
        missing = sorted(set(range(manifest_rows)) - set(seen.to_pylist()))[:10]
        raise JobFailed(
            f"accounting error: manifest rows {missing} have no result rows in {results}"
        )
    framed = table.filter(pc.is_valid(table.column("frame_index")))
    keys = ["manifest_row", "query_index", "frame_index"]
    if framed.group_by(keys).aggregate([]).num_rows != framed.num_rows:
        raise JobFailed(f"accounting error: a (video, query, frame) appears twice in {results}")
    # a failed video's rows and a failed query's: one per (video, query), or one without a query
    unframed = table.filter(pc.is_null(table.column("frame_index")))
    if unframed.group_by(keys[:2]).aggregate([]).num_rows != unframed.num_rows:
        raise JobFailed(
            f"accounting error: an error row of a (video, query) appears twice in {results}"
        )
    is_ok = pc.equal(table.column("status"), "ok")
    bad_videos = len(pc.unique(table.filter(pc.invert(is_ok)).column("manifest_row")))
    # a frame counts when every query's row of it is ok
    frames = (
        framed.append_column("ok", pc.equal(framed.column("status"), "ok"))
        .group_by(["manifest_row", "frame_index"])
        .aggregate([("ok", "all")])
    )
    counts = count_rows(table, "video_id")
    versions = pc.unique(table.column("model_version").drop_null()).to_pylist()
    summary = VideoSummary(
        videos=manifest_rows,
        videos_ok=manifest_rows - bad_videos,
        videos_error=bad_videos,
        frames=int(pc.sum(frames.column("ok_all")).as_py() or 0),
        rows_ok=counts.by_status.get("ok", 0),
        rows_error=counts.errors,
        seconds=seconds,
        results_uri=results,
        out=results.rsplit("/", 1)[0],
        model_version=", ".join(sorted(versions)) or None,
        resources=res.describe(),
        renders=renders,
        sample_errors=counts.sample_errors,
    )
    summary.counts = counts
    return summary


@ray.remote(num_cpus=1)
def _render(*args: Any) -> str:
    return render_video(*args)


def render_all(table: pa.Table, out: str, storage: Storage) -> int:
    """One MP4 per video that has at least one ok mask (one Ray task per video)."""
    ok = table.filter(pc.equal(table.column("status"), "ok")).to_pylist()
    by_video: dict[str, dict] = {}
    for r in ok:
        v = by_video.setdefault(
            r["video_id"], {"uri": r["uri"], "queries": {}, "frames": set(), "masks": {}}
        )
        v["queries"][r["query_index"]] = r["query"]
        v["frames"].add(r["frame_index"])
        v["masks"][(r["query_index"], r["frame_index"])] = r["mask_uri"]
    refs = []
    for vid, v in by_video.items():
        queries = sorted(v["queries"].items())
        frames = sorted(v["frames"])
        refs.append(_render.remote(v["uri"], vid, queries, frames, out, storage, None, v["masks"]))
    done = 0
    for ref in refs:
        try:
            ray.get(ref)
            done += 1
        except Exception as e:  # a render is a by-product: log it, the results stand
            logger.warning("render failed: %s", e)
    return done
