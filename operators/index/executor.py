"""Where the phases of an index build or add run: in this process, or as Ray tasks.

A build is one list of phases (:mod:`.build`); an executor only dispatches them. Both executors
run the same functions with the same arguments; what differs is the dispatch, and where a shard's
files wait for the merge: in this process they stay in a scratch folder on this machine, on Ray
they go through the store (tasks may run on other nodes).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Ray worker processes run one build task each, then exit: a task's heap (a training sample,
#: a shard's codes) would otherwise stay with the reused worker, returned to the allocator but not
#: to the system, and count again under the next task it runs (a 1M build's idle worker held
#: 1.1 GB that way). A worker's start-up is a second or two against tasks of minutes.
MAX_CALLS = 1


@contextlib.contextmanager
def timed(phase: str, seconds: dict[str, float]) -> Iterator[None]:
    """Record the wall seconds of ``phase`` in ``seconds`` (autofaiss' ``Timeit`` per phase)."""
    t0 = time.perf_counter()
    yield
    seconds[phase] = round(time.perf_counter() - t0, 3)
    logger.info("%s: %.1f s", phase, seconds[phase])


class InProcess:
    """Runs every phase here, one after the other (``workers=1``).

    Attributes:
        scratch: a folder on this machine, kept until the executor closes: shard files wait in it
            for the merge and the commit.
        gpu_shards: shards may add on this process's GPU.
    """

    workers = 1
    gpu_shards = True

    def __init__(self) -> None:
        self.scratch: str | None = None

    def __enter__(self) -> InProcess:
        self.scratch = tempfile.mkdtemp(prefix="vbatch-index-")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None

    def run(self, fn: Callable[..., T], *args: Any, use_gpu: bool | str = False) -> T:
        """``fn(*args)``."""
        return fn(*args)

    def map(self, fn: Callable[..., T], args: tuple[Any, ...], items: Sequence[Any]) -> list[T]:
        """``[fn(*args, item) for item in items]``, in order."""
        return [fn(*args, item) for item in items]


class OnRay:
    """Runs every phase as a Ray task (``workers > 1``; Ray must be initialised): one per call of
    :meth:`run`, one per item of :meth:`map`, all at once.

    Each task takes one CPU (faiss' threads follow OMP_NUM_THREADS, which Ray sets to a task's
    CPUs) and Ray retries a task whose worker died (2 retries): every phase rewrites its files
    whole, so a retry never duplicates anything.

    Attributes:
        scratch: ``None``: no folder outlives a task; shard files go through the store.
        gpu_shards: ``False``: shard tasks ask for no GPU (encoding is cheap next to training,
            and GPU nodes are few).
    """

    scratch = None
    gpu_shards = False

    def __init__(self, workers: int) -> None:
        self.workers = workers

    def __enter__(self) -> OnRay:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def run(self, fn: Callable[..., T], *args: Any, use_gpu: bool | str = False) -> T:
        """``fn(*args)`` as one Ray task, waited for; with a GPU when ``use_gpu`` allows one and
        the cluster has GPUs, or can add them (the task then checks that faiss sees one)."""
        import ray

        task = ray.remote(num_cpus=1, num_gpus=_gpus(use_gpu), max_retries=2, max_calls=MAX_CALLS)(
            fn
        )
        return ray.get(task.remote(*args))

    def map(self, fn: Callable[..., T], args: tuple[Any, ...], items: Sequence[Any]) -> list[T]:
        """``fn(*args, item)`` of every item, each in its own Ray task (``args`` put in the object
        store once); the results in the order of ``items``."""
        import ray

        refs = [ray.put(a) for a in args]
        task = ray.remote(num_cpus=1, max_retries=2, max_calls=MAX_CALLS)(fn)
        return ray.get([task.remote(*refs, item) for item in items])


def _gpus(use_gpu: bool | str) -> float:
    if use_gpu is False:
        return 0
    from vbatch.operators.ray_cluster import autoscaler_max_gpus, cluster_gpus

    return 1 if (cluster_gpus() or autoscaler_max_gpus() or 0) > 0 else 0


def executor_for(workers: int) -> InProcess | OnRay:
    """:class:`InProcess` for one worker, :class:`OnRay` for more."""
    return OnRay(workers) if workers > 1 else InProcess()
