"""What the Ray cluster a run is attached to has, and may get: GPUs up now and the GPUs its
autoscaler may add. Shared by the jobs' resource decisions (:mod:`vbatch.jobs.runtime`) and the
operators that size their own tasks (the index build's training task)."""

from __future__ import annotations

import ray

#: a cap for "the autoscaler may add without limit" (a node type with max_workers -1)
_UNBOUNDED_GPUS = 1024


def cluster_gpus() -> int:
    """GPUs up now."""
    return int(ray.cluster_resources().get("GPU", 0))


def autoscaler_max_gpus() -> int | None:
    """GPUs the cluster's autoscaler may run at most (node types × max workers), or ``None`` when
    the cluster publishes no autoscaler configuration (a fixed cluster, ``ray start`` by hand).

    Read the way Ray Data reads it for its own shuffles (a developer API of Ray's GCS state).
    """
    try:
        from ray._private.state import state

        limits = state.get_max_resources_from_cluster_config()
    except Exception:  # older Ray, no GCS access: as if there were no autoscaler
        return None
    if limits is None:
        return None
    return int(min(limits.get("GPU", 0), _UNBOUNDED_GPUS))
