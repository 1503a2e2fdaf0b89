"""A multi-node scenario on one machine, run by ``tests/test_multinode.py`` in its own process.

A Ray cluster of a head and two worker raylets (``ray.cluster_utils.Cluster``): a CPU node and a
"model" node carrying the custom resource ``model_node`` that stands in for the GPU nodes. Each
node has its own ``VBATCH_CACHE`` and no S3 credentials of its own. Against the S3 server whose
endpoint it is given, the script runs: the refusal of local paths; ``segment``; ``vbatch reid
search --manifest`` and ``vbatch video`` through the CLI; ``segment`` again on two CPU nodes, one
of which is killed while it runs a task of the pipeline. After each step it writes what it saw (rows, the nodes Ray placed each actor and task on,
the node caches) to a JSON file for the test to check, so a run cut short still shows how far it
got. Each step has a deadline: past it the script logs the cluster's state and every thread's
stack, and exits 3.

Run in a subprocess because the test session may already hold a local Ray instance.

Usage: ``python tests/multinode_job.py CONFIG.json RESULT.json``; the config holds ``endpoint``,
``manifest``, ``model_dir``, ``out`` (a prefix: the runs write below it), ``work`` (a local
folder), ``reid`` (``index``, ``manifest``, ``model_dir``, ``out``) and ``video`` (``manifest``,
``model_dir``, ``out``).
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray
from ray.cluster_utils import Cluster

from vbatch.jobs.cli import main as cli
from vbatch.jobs.runtime import LocalPathOnClusterError
from vbatch.jobs.segment import ImageJobConfig, run_image_job
from vbatch.operators.storage import Storage, StorageOptions, join

logger = logging.getLogger("multinode")

#: node start-up on a loaded machine may miss Ray's fixed 30 s registration deadline: try again
START_ATTEMPTS = 4
#: seconds each step may take (a quiet 2-core machine needs a fifth of it); past it: exit 3
DEADLINES = {
    "cluster up": 300,
    "refusal and probe without forwarding": 180,
    "segment": 300,
    "reid search": 300,
    "video": 300,
    "killed node": 420,
}
#: CPUs of each CPU node: one task at a time, as many worker processes, each of which imports
#: torch (seconds on the 2-core test machine)
CPU_NODE_CPUS = 1
#: workers report their task events to the GCS once a second (task_events_report_interval_ms)
EVENTS_FLUSH_S = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _add_node(cluster: Cluster | None, **args: Any) -> tuple[Cluster, Any]:
    for attempt in range(START_ATTEMPTS):
        try:
            if cluster is None:
                cluster = Cluster(initialize_head=True, head_node_args=args)
                return cluster, cluster.head_node
            return cluster, cluster.add_node(**args)
        except Exception as e:  # "The current node timed out during startup"
            logger.warning("node start-up failed (attempt %d): %s", attempt + 1, e)
            if cluster is not None and cluster.head_node is None:
                cluster = None
            time.sleep(5)
    raise RuntimeError("could not start a Ray node")


def _model_dirs(cache: Path) -> list[str]:
    folder = cache / "model-dirs"
    return (
        sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
        if folder.is_dir()
        else []
    )


def _actors() -> dict[str, dict[str, Any]]:
    """Every actor of this job, alive or dead, as the GCS's actor table holds it (what ``ray list
    actors`` shows; read from the GCS, so no dashboard is needed): actor id → its ``repr`` (Ray
    Data's ``MapWorker(MapBatches(ModelStage))``), node and custom resources."""
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    job = ray.get_runtime_context().get_job_id()
    out = {}
    for raw in state._connect_and_get_accessor().get_actor_table(None, None):
        a = gcs_pb2.ActorTableData.FromString(raw)
        if a.job_id.hex() != job:
            continue
        out[a.actor_id.hex()] = {
            "repr": a.repr_name or a.class_name,
            "node": a.address.node_id.hex() or a.node_id.hex(),
            "resources": {k: v for k, v in a.required_resources.items() if k != "CPU"},
            "state": gcs_pb2.ActorTableData.ActorState.Name(a.state),
        }
    return out


def _tasks() -> dict[str, dict[str, Any]]:
    """Every task and actor task of this job with the node it ran on, from the task events the
    GCS keeps (what ``ray list tasks`` shows): task id → name (Ray Data names a task after its
    fused stages, ``MapBatches(fetch_bytes)->MapBatches(decode_and_preprocess)``), type, the nodes
    its attempts ran on, and how many attempts (more than one: Ray retried it)."""
    from ray._private.state import state
    from ray.core.generated import common_pb2

    time.sleep(EVENTS_FLUSH_S)
    job = ray.get_runtime_context().get_job_id()
    out: dict[str, dict[str, Any]] = {}
    for ev in state._get_all_task_events():
        if ev.job_id.hex() != job:
            continue
        t = out.setdefault(
            ev.task_id.hex(), {"name": None, "type": None, "nodes": [], "attempts": 1}
        )
        t["attempts"] = max(t["attempts"], ev.attempt_number + 1)
        if ev.HasField("task_info"):
            t["name"] = ev.task_info.name or t["name"]
            t["type"] = common_pb2.TaskType.Name(ev.task_info.type)
        if ev.HasField("state_updates") and ev.state_updates.node_id:
            node = ev.state_updates.node_id.hex()
            if node not in t["nodes"]:
                t["nodes"].append(node)
    return out


def _since(now: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in now.items() if k not in before}


@ray.remote(num_cpus=0)
def _env_probe() -> dict:
    return {
        "node": ray.get_runtime_context().get_node_id(),
        "aws": sorted(k for k in os.environ if k.startswith("AWS_")),
    }


def _cluster_state() -> str:
    """Alive nodes with their free resources, and the actors not alive: why a step waits."""
    try:
        from ray._private.state import state

        free = state.available_resources_per_node()
        pending = [a for a in _actors().values() if a["state"] != "ALIVE"]
        return f"free resources per node: {free}; actors not alive: {pending}"
    except Exception as e:
        return f"(cluster state unavailable: {e!r})"


@contextmanager
def deadline(step: str, on_timeout: Any) -> Iterator[None]:
    """Give ``step`` DEADLINES[step] seconds; past them log why and exit 3 (the test reads the
    step's name from the result file and the log)."""

    def expire() -> None:
        logger.error("step %r still running after %d s: giving up", step, DEADLINES[step])
        logger.error("%s", _cluster_state())
        faulthandler.dump_traceback(all_threads=True)
        on_timeout(step)
        os._exit(3)

    timer = threading.Timer(DEADLINES[step], expire)
    timer.daemon = True
    timer.start()
    started = time.monotonic()
    try:
        yield
    finally:
        timer.cancel()
        logger.info("step %r took %.0f s", step, time.monotonic() - started)


def main(config_path: str, result_path: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    conf = json.loads(Path(config_path).read_text())
    work = Path(conf["work"])
    result: dict = {"steps": [], "seconds": {}}
    clock = time.monotonic()

    def save(step: str) -> None:
        # after every step: a run cut short by a deadline still shows how far it got
        result["steps"].append(step)
        result["seconds"][step] = round(time.monotonic() - clock)
        Path(result_path).write_text(json.dumps(result, indent=1))
        logger.info("step done: %s", step)

    def timed_out(step: str) -> None:
        result["timed_out"] = step
        Path(result_path).write_text(json.dumps(result, indent=1))

    # the nodes get no credentials of their own: the driver's reach them only when forwarded
    aws = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("AWS_")}
    names = ("head", "cpu", "model", "cpu2", "driver")
    caches = {name: work / f"cache-{name}" for name in names}

    def node_args(name: str, **args: Any) -> dict[str, Any]:
        return {**args, "env_vars": {"VBATCH_CACHE": str(caches[name])}}

    with deadline("cluster up", timed_out):
        # no dashboard (nothing here needs it; it costs a process and seconds); the head's
        # dashboard agent on a free port, not Ray's fixed 52365, which another Ray instance on the
        # machine (the test session's own) may hold
        # the head runs the driver and no tasks (num_cpus=0, as a production head does): the
        # pipeline's CPU tasks all go to the CPU node
        head_args = node_args("head", num_cpus=0, include_dashboard=False)
        head_args["dashboard_agent_listen_port"] = _free_port()
        cluster, head = _add_node(None, **head_args)
        cluster, cpu_node = _add_node(cluster, **node_args("cpu", num_cpus=CPU_NODE_CPUS))
        cluster, model_node = _add_node(
            cluster, **node_args("model", num_cpus=1, resources={"model_node": 1})
        )
        cluster.wait_for_nodes(timeout=300)
    os.environ.update(aws)
    os.environ["VBATCH_CACHE"] = str(caches["driver"])
    nodes = {"head": head.node_id, "cpu": cpu_node.node_id, "model": model_node.node_id}
    result["nodes"] = nodes
    save("cluster up")
    storage = Storage(StorageOptions(endpoint_url=conf["endpoint"]))

    def cfg(out: str, forward: bool = True, **kw: Any) -> ImageJobConfig:
        return ImageJobConfig(
            "salient",
            conf["manifest"],
            conf["model_dir"],
            out,
            batch_size=4,
            rows_per_block=4,
            s3_endpoint=conf["endpoint"],
            address=cluster.address,
            forward_s3_env=forward,
            actor_resources={"model_node": 1},
            **kw,
        )

    def caches_now() -> dict[str, list[str]]:
        return {k: _model_dirs(v) for k, v in caches.items()}

    # 1. without --forward-s3-env nothing reaches the workers; local paths are refused at once
    with deadline("refusal and probe without forwarding", timed_out):
        try:
            run_image_job(cfg(str(work / "local-out"), forward=False))
            result["local_out"] = None
        except LocalPathOnClusterError as e:
            result["local_out"] = str(e)
        result["probe_without"] = ray.get(
            _env_probe.options(resources={"model_node": 1}).remote(), timeout=120
        )
        result["local_out_written"] = (work / "local-out").exists()
        ray.shutdown()
    save("refusal and probe without forwarding")

    # 2. segment, credentials forwarded: rows, and where Ray placed its actors and tasks
    with deadline("segment", timed_out):
        out1 = join(conf["out"], "run1")
        s1 = run_image_job(cfg(out1))
        result["segment"] = {"rows": s1.rows, "ok": s1.ok, "out": out1}
        result["probe_with"] = ray.get(
            _env_probe.options(resources={"model_node": 1}).remote(), timeout=120
        )
        tasks, actors = _tasks(), _actors()
        result["segment"].update(tasks=tasks, actors=actors, caches=caches_now())
    save("segment")

    # 3. the CLI's reid search over a manifest: embedded on the model node, searched, committed
    # (the same Ray job as segment's: the CLI joins nothing when Ray is up, and Ray reuses the
    # job's idle workers, each of which took seconds to start and import torch)
    common = ["--s3-endpoint", conf["endpoint"], "--address", cluster.address]
    common += ["--forward-s3-env", "--actor-resource", "model_node=1"]
    common += ["--report-samples", "0"]  # the report is the driver's work, tested elsewhere
    with deadline("reid search", timed_out):
        before_tasks, before_actors = _tasks(), _actors()
        reid = conf["reid"]
        args = ["reid", "search", "--index", reid["index"], "--manifest", reid["manifest"]]
        args += ["--model-dir", reid["model_dir"], "--out", reid["out"], "--k", "2"]
        # one of the queries is a missing image: an error row, over the default 1 %
        args += ["--batch-size", "4", "--max-error-rate", "0.5", *common]
        code = cli(args)
        result["reid"] = {
            "exit": code,
            "tasks": _since(_tasks(), before_tasks),
            "actors": _since(_actors(), before_actors),
        }
    save("reid search")

    # 4. the CLI's video job: one row per (video, query, frame), error rows for the bad videos
    with deadline("video", timed_out):
        before_tasks, before_actors = _tasks(), _actors()
        video = conf["video"]
        args = ["video", "--manifest", video["manifest"], "--model-dir", video["model_dir"]]
        # the missing video is an error row, over the default 1 %
        args += ["--out", video["out"], "--max-error-rate", "0.5", *common]
        code = cli(args)
        result["video"] = {
            "exit": code,
            "tasks": _since(_tasks(), before_tasks),
            "actors": _since(_actors(), before_actors),
        }
        result["caches_end"] = caches_now()
    save("video")

    # 5. a CPU node dies mid-run, while it runs a task of the pipeline; the other one, added first,
    # is where the run goes on (the head has no CPU for tasks, the model node's is its actor's;
    # Cluster.add_node needs the main thread, so it cannot wait for the loss). Last, as nothing
    # after it needs the lost node.
    with deadline("killed node", timed_out):
        cluster, cpu2 = _add_node(cluster, **node_args("cpu2", num_cpus=CPU_NODE_CPUS))
        cluster.wait_for_nodes(timeout=120)
        nodes["cpu2"] = cpu2.node_id
        cpu_nodes = {"cpu": cpu_node, "cpu2": cpu2}
        # Ray Data starts a pipeline's CPU tasks while its actors start, so the first fetch task
        # may take the model node's one CPU before the actor does; here the pipeline waits for
        # its actor, so that its tasks can only go to the CPU nodes, where the kill finds them
        ray.data.DataContext.get_current().wait_for_min_actors_s = DEADLINES["killed node"]
        out2 = join(conf["out"], "run2")
        killed = threading.Event()
        before_tasks, before_actors = _tasks(), _actors()

        def kill() -> None:
            from ray._private.state import state

            stop = time.monotonic() + DEADLINES["killed node"]
            reason, victim = "deadline", "cpu"
            while time.monotonic() < stop:
                # the pipeline runs once its model actor exists; its CPU stages then hold a CPU
                # node's CPU (fetch/decode go on while the actor starts: their output queues up
                # in that node's object store)
                new = _since(_actors(), before_actors).values()
                if any("ModelStage" in a["repr"] for a in new):
                    free = state.available_resources_per_node()
                    busy = [
                        name
                        for name, node in cpu_nodes.items()
                        if free.get(node.node_id, {}).get("CPU", CPU_NODE_CPUS) < CPU_NODE_CPUS
                    ]
                    if busy:
                        reason, victim = "running a task of the pipeline", busy[0]
                        break
                try:
                    if storage.list_files(join(out2, "masks")):
                        reason = "masks written"
                        break
                except FileNotFoundError:
                    pass
                time.sleep(0.1)
            cluster.remove_node(cpu_nodes[victim], allow_graceful=False)
            result["kill"] = {"reason": reason, "node": victim}
            killed.set()
            logger.info("removed CPU node %r: %s", victim, reason)

        killer = threading.Thread(target=kill, daemon=True)
        killer.start()
        try:
            s2 = run_image_job(cfg(out2))
            result["killed"] = {"rows": s2.rows, "ok": s2.ok, "error": None}
        except Exception as e:  # failed clearly: a rerun must complete
            logger.warning("the run that lost its CPU node failed: %s; running it again", e)
            result["killed"] = {"error": f"{type(e).__name__}: {e}"}
            ray.shutdown()
            s2 = run_image_job(cfg(out2))
            result["killed"].update(rows=s2.rows, ok=s2.ok, rerun=True)
        result["killed"]["out"] = out2
        result["killed"]["before_end"] = killed.is_set()
        killer.join(timeout=5)
        result["killed"].update(result.pop("kill", {}))
        tasks = _since(_tasks(), before_tasks)
        result["killed"]["retried"] = sorted(t["name"] for t in tasks.values() if t["attempts"] > 1)
        result["killed"]["caches"] = caches_now()
    save("killed node")

    ray.shutdown()
    cluster.shutdown()
    save("done")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
