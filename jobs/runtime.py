"""Ray start-up and the hardware-dependent defaults of every job.

Resources are decided here, not in the operators: batch size, pool size, GPUs and threads per actor.
Every default names the assumption it rests on.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import ray

from vbatch.models.registry import model_entry
from vbatch.operators.ray_cluster import autoscaler_max_gpus, cluster_gpus

logger = logging.getLogger(__name__)

_PACKAGES = ("jobs", "operators", "models", "schemas")


def package_for_workers() -> str:
    """A folder named ``vbatch`` that holds the driver's copy of the vbatch sub-packages.

    An installed wheel already has one. A development install maps ``vbatch.jobs`` onto the
    repository's ``jobs/`` folder (and so on), so the four folders are copied under a temporary
    ``vbatch/`` for Ray's ``py_modules`` to zip.
    """
    dirs = [Path(importlib.import_module(f"vbatch.{p}").__path__[0]) for p in _PACKAGES]
    parents = {d.parent for d in dirs}
    if len(parents) == 1 and next(iter(parents)).name == "vbatch":
        return str(next(iter(parents)))
    target = Path(tempfile.mkdtemp(prefix="vbatch-py-modules-")) / "vbatch"
    for name, d in zip(_PACKAGES, dirs, strict=True):
        shutil.copytree(d, target / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return str(target)


class ClusterConnectError(RuntimeError):
    """Joining a Ray cluster failed; the message says what to try."""

    def __init__(self, address: str, cause: BaseException) -> None:
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        hint = ""
        token = Path.home() / ".ray" / "auth_token"
        if os.environ.get("RAY_AUTH_MODE", "").lower() != "token" and (
            token.exists() or os.environ.get("RAY_AUTH_TOKEN") or "auth" in str(cause).lower()
        ):
            # a `ray start` cluster with token authentication refuses drivers that do not send the
            # token, and Ray's own message ("Failed to connect") does not say so
            hint = (
                "; the cluster may use token authentication: set RAY_AUTH_MODE=token (the token is "
                f"read from RAY_AUTH_TOKEN or {token})"
            )
        super().__init__(f"cannot join the Ray cluster at {address}: {first}{hint}")


#: the driver's variables that ``--forward-s3-env`` passes to the job's workers: the AWS SDK's
#: credentials, region, profile and endpoint settings (``AWS_ENDPOINT_URL`` included)
FORWARD_PREFIXES = ("AWS_",)


def s3_env_to_forward() -> dict[str, str]:
    """The driver's ``AWS_*`` variables, for the workers' ``runtime_env``.

    Returns:
        name → value (empty when the driver has none).
    """
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARD_PREFIXES)}


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _pool_actors() -> dict[bytes, Any]:
    """The handles this process holds to actors of Ray Data's actor pools, by actor id."""
    from ray.actor import ActorHandle

    found = {}
    for o in gc.get_objects():
        if issubclass(type(o), ActorHandle):  # type(): isinstance would wake lazy modules up
            descriptor = getattr(o, "_ray_actor_creation_function_descriptor", None)
            # the pools' actor class is named after the stage: "MapWorker(MapBatches(ModelStage))"
            if getattr(descriptor, "module_name", "").endswith(".actor_pool_map_operator"):
                found[o._actor_id.binary()] = o
    return found


def releases_actors(job: Callable[_P, _R]) -> Callable[_P, _R]:
    """Decorate a job that runs Ray Data pipelines: when it fails, the actors its pipelines
    started are killed as it returns.

    Ray Data stops a failed execution by dropping its references to the pool's actors, and Ray
    kills an actor once nothing references it; but the stopped executor sits in reference cycles
    that still hold the handles (an in-flight task's callback names its actor). The actors lived
    on, each holding its CPU (and GPU), until Python's cyclic collector happened to run, and the
    next job of the same process (a rerun in a long-lived driver or a notebook, the tests) waited
    for resources that never freed. So the pool actors this process holds handles to, less those
    it held when the job began, are killed before the exception goes on (a job running at the
    same time in another thread of the same process would lose the actors it started meanwhile:
    the CLI never runs two).
    """

    @functools.wraps(job)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        before = set(_pool_actors())
        try:
            return job(*args, **kwargs)
        except BaseException:
            for actor_id, handle in _pool_actors().items():
                if actor_id not in before:
                    with contextlib.suppress(Exception):  # already dead
                        ray.kill(handle, no_restart=True)
            raise

    return run


def ensure_ray(
    address: str | None = None, num_cpus: int | None = None, forward_s3_env: bool = False
) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``) when given, else start a local Ray; reuse a running one.

    On a cluster, the driver's copy of the vbatch packages is shipped with the job (``py_modules``)
    so workers run exactly the code the driver runs.

    Args:
        address: a Ray cluster's address (``host:port`` or ``ray://…``); None: ``RAY_ADDRESS`` or a
            local Ray.
        num_cpus: CPUs of a local Ray (default: the machine's).
        forward_s3_env: pass the driver's ``AWS_*`` variables (credentials, region, endpoint) to
            every worker of the job through ``runtime_env["env_vars"]``. Off by default: the
            credentials then travel with the job's runtime environment (visible to whoever can read
            the cluster's job table), so it is an explicit choice, never silent.
    """
    if ray.is_initialized():
        if forward_s3_env:
            logger.warning("--forward-s3-env has no effect: Ray was already initialised")
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict = {"include_dashboard": False, "logging_level": logging.WARNING}
    runtime_env: dict = {}
    if forward_s3_env:
        env = s3_env_to_forward()
        if not env:
            logger.warning("--forward-s3-env: the driver has no AWS_* variable to forward")
        runtime_env["env_vars"] = env
        # names only: the values are secrets
        logger.info("forwarding %s to the job's workers", ", ".join(sorted(env)) or "nothing")
    if address and address != "local":
        runtime_env["py_modules"] = [package_for_workers()]
        try:
            ray.init(address=address, runtime_env=runtime_env, **kwargs)
        except Exception as e:
            raise ClusterConnectError(address, e) from e
    else:
        # "local": a new Ray of our own, even when a `ray start` cluster runs on this machine
        # (without it, ray.init() joins that cluster: /tmp/ray/ray_current_cluster)
        ray.init(address="local", num_cpus=num_cpus, runtime_env=runtime_env or None, **kwargs)


def actor_resources(resources: dict[str, float] | None) -> dict[str, Any]:
    """Ray remote arguments that pin the model actors to the nodes carrying ``resources``.

    Args:
        resources: custom resource → amount per actor (``--actor-resource``); None: no pinning.

    Returns:
        ``{"resources": …}`` for ``map_batches``, or ``{}``.
    """
    return {"resources": dict(resources)} if resources else {}


def resolve_job_precision(
    task: str, requested: str | None, res: Resources, resources: dict[str, float] | None = None
) -> tuple[str, str]:
    """The precision the model actors run ``task`` at, and why (for the log, summary, run.json).

    ``requested`` ``None`` takes the model's default (``ModelEntry.default_precision``); ``"auto"``
    is bf16 where the device runs it natively (``models.precision.resolve_precision``). The device
    decides, so on GPUs or a cluster of several nodes ``auto`` is resolved by a task placed as the
    model actors are (a driver's CPU says nothing of a worker node's); locally, here.

    Raises:
        ValueError: a precision the model or the device cannot run.
    """
    from vbatch.models.precision import resolve_precision

    entry = model_entry(task)
    if "precision" not in entry.options:
        if requested in (None, "auto", "fp32"):
            return "fp32", f"fp32: {task} runs in fp32 only"
        raise ValueError(
            f"--precision {requested}: {task} runs in fp32 only (ONNX Runtime has no faster "
            "path that keeps its mattes within 2 grey levels on x86: docs/BENCHMARKS.md)"
        )
    requested = requested or entry.default_precision
    alive = len([n for n in ray.nodes() if n.get("Alive")])
    if requested == "auto" and (res.device == "cuda" or alive > 1):
        probe = ray.remote(resolve_precision).options(
            num_cpus=0, num_gpus=res.gpus_per_actor or 0, **actor_resources(resources)
        )
        precision, reason = ray.get(probe.remote(requested, res.device), timeout=600)
        return str(precision), str(reason)
    return resolve_precision(requested, res.device)


def model_pool_stage(
    ds: ray.data.Dataset,
    stage: type,
    constructor_kwargs: dict[str, Any],
    res: Resources,
    resources: dict[str, float] | None,
) -> ray.data.Dataset:
    """``ds`` through a pool of model actors (``stage(**constructor_kwargs)`` in each), sized and
    placed by ``res`` (:func:`decide_resources`) and pinned by the custom ``resources``: the one
    model stage of every job (images and video windows).

    Returns:
        The dataset of the stage's output rows, one per input row.
    """
    return ds.map_batches(
        stage,
        fn_constructor_kwargs=constructor_kwargs,
        compute=ray.data.ActorPoolStrategy(min_size=res.pool_size()[0], max_size=res.actors),
        batch_size=res.batch_size,
        batch_format="pyarrow",
        num_gpus=res.gpus_per_actor or None,
        # one logical CPU: the actor's torch threads use the cores; CPU stages still get scheduled
        num_cpus=1,
        # the replica's host memory (ModelEntry.actor_memory_gb). Because it differs from the CPU
        # stages' resources, Ray also never fuses decoding into the actor (it would on a CPU-only
        # cluster): decoding overlaps with inference instead of waiting for it.
        memory=res.memory,
        # custom resources pin the actors to the nodes that carry them (a node type's label)
        **actor_resources(resources),
        udf_modifying_row_count=False,
    )


class LocalPathOnClusterError(ValueError):
    """A local path given to a job on a cluster of several nodes."""


def refuse_local_paths_on_cluster(paths: dict[str, str | None]) -> None:
    """Refuse local paths when the Ray cluster has more than one alive node (after :func:`ensure_ray`).

    Workers read the manifest and the model directory and write the outputs on their own node: a
    local path there means each node's own disk, and the job would fail late (an accounting error
    after the whole run) or scatter its outputs. A shared filesystem mounted on every node is not
    detected; put the data on object storage.

    Args:
        paths: option name (``"--out"``) → the URI given (None: not given).

    Raises:
        LocalPathOnClusterError: naming every local path and the number of nodes.
    """
    from vbatch.operators.storage import is_http, is_remote

    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    if nodes <= 1:
        return
    local = [f"{k} {v}" for k, v in paths.items() if v and not (is_remote(v) or is_http(v))]
    if local:
        raise LocalPathOnClusterError(
            f"the Ray cluster has {nodes} nodes and each reads and writes its own local disk: "
            f"use object storage (s3://…) for {', '.join(local)}"
        )


def cluster_cpus() -> int:
    return int(ray.cluster_resources().get("CPU", 1))


def node_cpus() -> int:
    """CPUs of the largest alive node: what one model actor's threads are sized from (not the
    driver's cores, which on a cluster are the head's)."""
    cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    return int(max(cpus, default=os.cpu_count() or 1)) or 1


@dataclass(frozen=True)
class Resources:
    """What the model stage's actor pool gets."""

    batch_size: int
    #: model replicas at most (the pool grows to it as GPU nodes come up)
    actors: int
    gpus_per_actor: float
    #: torch intra-op threads per actor (CPU inference)
    threads: int
    device: str
    #: bytes of host memory reserved per actor
    memory: int
    #: replicas the pool starts with (``actors`` unless GPU nodes may still be added)
    min_actors: int = 0

    def pool_size(self) -> tuple[int, int]:
        """(min, max) replicas for ``ray.data.ActorPoolStrategy``."""
        return (self.min_actors or self.actors, self.actors)

    def describe(self) -> str:
        where = (
            f"{self.gpus_per_actor:g} GPU each"
            if self.gpus_per_actor
            else f"CPU, {self.threads} threads each"
        )
        pool = (
            f"{self.min_actors}–{self.actors}"
            if self.min_actors not in (0, self.actors)
            else str(self.actors)
        )
        return f"{pool} actor(s), {where}, batch {self.batch_size}"


def probe_gpu_memory() -> tuple[int, int] | None:
    """(free, total) bytes of one GPU of the cluster, measured by a one-GPU task; None without GPUs."""
    if not cluster_gpus():
        return None

    @ray.remote(num_gpus=1)
    def _probe() -> tuple[int, int]:
        import torch

        return torch.cuda.mem_get_info()

    try:
        return ray.get(_probe.remote(), timeout=120)
    except Exception as e:  # no GPU free right now, driver mismatch, …: fall back to the table
        logger.warning("could not probe GPU memory (%s); using the default batch size", e)
        return None


def shop_seg_gpu_batch(free_bytes: int, precision: str, cap: int = 64) -> int:
    """The largest batch whose activations fit 60 % of the GPU memory left after the weights.

    60 %: headroom for the caching allocator's fragmentation and cuDNN workspaces.
    """
    from vbatch.models.shop_seg import FULL, activation_bytes_per_image

    weights = 0.68 * 2**30  # 170.5 M fp32 parameters
    per_image = activation_bytes_per_image(FULL, precision)
    return int(max(1, min(cap, 0.6 * (free_bytes - weights) // per_image)))


DEVICES = ("auto", "cpu", "cuda")


def decide_resources(
    task: str,
    batch_size: int | None = None,
    actors: int | None = None,
    gpus_per_actor: float | None = None,
    threads: int | None = None,
    precision: str | None = "fp32",
    device: str = "auto",
) -> Resources:
    """Fill in the model stage's resources from the cluster (after :func:`ensure_ray`).

    ``device``: ``cpu``; ``cuda`` requests GPUs for the actors even when none is up yet (an
    autoscaler then brings GPU nodes: nothing here depends on what is up at submit time); ``auto``
    uses GPUs when the cluster has them now or its autoscaler can add them, else the CPU.

    With GPUs: one actor per GPU the cluster can have (one model replica per GPU saturates it for
    these models); the pool starts with the GPUs up now (at least one) and grows as GPU nodes
    join. Without: one actor using a node's cores (a second replica on the same cores only adds
    memory); the CPU stages run in the gaps: decoding costs ~1/30 of a forward here.
    """
    if device not in DEVICES:
        raise ValueError(f"--device {device!r}: choose one of {', '.join(DEVICES)}")
    gpus_now = cluster_gpus()
    gpus_max = autoscaler_max_gpus()
    gpus_reachable = max(gpus_now, gpus_max or 0)
    if device == "cpu":
        if gpus_per_actor:
            raise ValueError("--device cpu and --gpus-per-actor > 0 contradict each other")
        gpus_per_actor = 0.0
    elif device == "cuda":
        gpus_per_actor = gpus_per_actor or 1.0
    elif gpus_per_actor is None:
        gpus_per_actor = 1.0 if gpus_reachable else 0.0
    on_gpu = gpus_per_actor > 0
    if on_gpu and not gpus_reachable:
        # not refused: the cluster may gain GPU nodes we cannot see (an autoscaler that does not
        # publish its configuration); the actors wait for them
        logger.warning(
            "GPU actors requested, but the Ray cluster has no GPU now and no autoscaler "
            "configuration that could add one: the model stage waits until a GPU node joins"
        )
    min_actors = 0
    if actors is None:
        if on_gpu:
            actors = max(1, int(gpus_reachable // gpus_per_actor))
            min_actors = max(1, min(actors, int(gpus_now // gpus_per_actor)))
        else:
            actors = 1
    if threads is None:
        # a single-node cluster shares its cores among the replicas; on several nodes each
        # replica gets a node's cores
        share = actors if len([n for n in ray.nodes() if n.get("Alive")]) <= 1 else 1
        threads = 4 if on_gpu else max(1, node_cpus() // share)
    precision = (
        precision if precision in ("fp32", "bf16", "fp16") else "fp32"
    )  # auto: resolved later
    if not on_gpu and precision == "fp16":
        raise ValueError("--precision fp16 needs a GPU; on CPU use bf16 or fp32")
    if batch_size is None and on_gpu and task == "shop-seg" and gpus_now:
        probed = probe_gpu_memory()
        if probed is not None:
            batch_size = shop_seg_gpu_batch(probed[0], precision)
            logger.info(
                "shop-seg batch %d from %.1f GiB free GPU memory (%s)",
                batch_size,
                probed[0] / 2**30,
                precision,
            )
    entry = model_entry(task)
    if batch_size is None:
        batch_size = entry.default_batch("gpu" if on_gpu else "cpu")
    if batch_size < 1 or actors < 1:
        raise ValueError("--batch-size and --actors must be at least 1")
    memory = int(entry.actor_memory_gb * 2**30)
    return Resources(
        batch_size,
        actors,
        gpus_per_actor,
        threads,
        "cuda" if on_gpu else "cpu",
        memory,
        min_actors,
    )
