"""Ray start-up and the hardware-dependent defaults of every job.

Resources are decided here, not in the operators: batch size, pool size, GPUs and threads per actor.
Every default names the assumption it rests on.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ray

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


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``) when given, else start a local Ray; reuse a running one.

    On a cluster, the driver's copy of the vbatch packages is shipped with the job (``py_modules``)
    so workers run exactly the code the driver runs.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict = {"include_dashboard": False, "logging_level": logging.WARNING}
    if address:
        kwargs["runtime_env"] = {"py_modules": [package_for_workers()]}
        try:
            ray.init(address=address, **kwargs)
        except Exception as e:
            raise ClusterConnectError(address, e) from e
    else:
        ray.init(num_cpus=num_cpus, **kwargs)


def cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def cluster_cpus() -> int:
    return int(ray.cluster_resources().get("CPU", 1))


#: Default images per model-stage batch, per (task, device kind).
DEFAULT_BATCH = {
    # SENet at 320²: ~0.3 GB of activations per image in fp32; 32 fits a 16 GB GPU with room to spare.
    ("salient", "gpu"): 32,
    # DenseCLIP ViT-B/16 at 1024²: when the GPU can be probed, shop_seg_gpu_batch() sizes the batch
    # from its free memory; this is the fallback (0.52 GB of fp32 activations per image measured,
    # 0.68 GB of weights: 8 leaves half of a 16 GB GPU free).
    ("shop-seg", "gpu"): 8,
    # ViT-B/16 at 256×128: tiny activations; large batches keep the GPU busy.
    ("reid", "gpu"): 128,
    # the matting graph takes one image at a time; the batch only amortises Ray's per-call overhead
    ("matting", "gpu"): 8,
    # CPU: small batches keep the pipeline flowing; the forward cost per image hardly changes
    ("salient", "cpu"): 8,
    ("shop-seg", "cpu"): 2,
    ("reid", "cpu"): 32,
    ("matting", "cpu"): 4,
}


#: Host memory reserved per model replica (weights + a batch of activations + framework overhead,
#: measured on CPU with the default batch). Ray packs no more replicas onto a node than fit.
ACTOR_MEMORY_GB = {"salient": 2.0, "shop-seg": 4.0, "reid": 2.0, "matting": 2.0, "rvos": 6.0}


@dataclass(frozen=True)
class Resources:
    """What the model stage's actor pool gets."""

    batch_size: int
    actors: int
    gpus_per_actor: float
    #: torch intra-op threads per actor (CPU inference)
    threads: int
    device: str
    #: bytes of host memory reserved per actor
    memory: int

    def describe(self) -> str:
        where = (
            f"{self.gpus_per_actor:g} GPU each"
            if self.gpus_per_actor
            else f"CPU, {self.threads} threads each"
        )
        return f"{self.actors} actor(s), {where}, batch {self.batch_size}"


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


def decide_resources(
    task: str,
    batch_size: int | None = None,
    actors: int | None = None,
    gpus_per_actor: float | None = None,
    threads: int | None = None,
    precision: str = "fp32",
) -> Resources:
    """Fill in the model stage's resources from the cluster (after :func:`ensure_ray`).

    With GPUs: one actor per GPU (one model replica per GPU saturates it for these models).
    Without: one actor using the cores (a second replica on the same cores only adds memory); the
    CPU stages run in the gaps: decoding costs ~1/30 of a forward here.
    """
    gpus = cluster_gpus()
    if gpus_per_actor is None:
        gpus_per_actor = 1.0 if gpus else 0.0
    on_gpu = gpus_per_actor > 0
    if on_gpu and not gpus:
        raise ValueError(f"--gpus-per-actor {gpus_per_actor} but the Ray cluster has no GPU")
    if actors is None:
        actors = max(1, int(gpus // gpus_per_actor)) if on_gpu else 1
    if threads is None:
        threads = 4 if on_gpu else max(1, (os.cpu_count() or 1) // actors)
    if not on_gpu and precision == "fp16":
        raise ValueError("--precision fp16 needs a GPU; on CPU use bf16 or fp32")
    if batch_size is None and on_gpu and task == "shop-seg":
        probed = probe_gpu_memory()
        if probed is not None:
            batch_size = shop_seg_gpu_batch(probed[0], precision)
            logger.info(
                "shop-seg batch %d from %.1f GiB free GPU memory (%s)",
                batch_size,
                probed[0] / 2**30,
                precision,
            )
    if batch_size is None:
        batch_size = DEFAULT_BATCH.get((task, "gpu" if on_gpu else "cpu"), 8)
    if batch_size < 1 or actors < 1:
        raise ValueError("--batch-size and --actors must be at least 1")
    memory = int(ACTOR_MEMORY_GB.get(task, 4.0) * 2**30)
    return Resources(
        batch_size, actors, gpus_per_actor, threads, "cuda" if on_gpu else "cpu", memory
    )
