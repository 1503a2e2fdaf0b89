"""A multi-node scenario on one machine, run by ``tests/test_multinode.py`` in its own process.

A Ray cluster of a head and two worker raylets (``ray.cluster_utils.Cluster``): a CPU node and a
"model" node carrying the custom resource ``model_node`` that stands in for the GPU nodes. Each
node has its own ``VBATCH_CACHE`` and no S3 credentials of its own. Against the S3 server whose
endpoint it is given, the script runs: the refusal of local paths; ``segment``; ``vbatch reid
search --manifest`` and ``vbatch video`` through the CLI; ``segment`` again, its CPU node killed
while it fetches an image, a new CPU node joining. After each step it writes what it saw (rows, the nodes Ray placed each actor and task on,
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
import http.server
import io
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

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.cluster_utils import Cluster

from vbatch.jobs.cli import main as cli
from vbatch.jobs.demo_data import encode, product_image
from vbatch.jobs.runtime import LocalPathOnClusterError
from vbatch.jobs.segment import ImageJobConfig, run_image_job
from vbatch.operators.storage import Storage, StorageOptions, join, parent

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
#: images of the segment manifest (tests/test_multinode.py writes them)
IMAGES = 24
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


def _slow_image_server(body: bytes) -> http.server.ThreadingHTTPServer:
    """A loopback HTTP server of one image whose first GET waits for ``release`` (its handler
    class's ``asked`` is set when that GET arrives); later requests are answered at once."""

    class SlowImage(http.server.BaseHTTPRequestHandler):
        asked, release = threading.Event(), threading.Event()

        def do_HEAD(self) -> None:
            self._headers()

        def do_GET(self) -> None:
            if not self.asked.is_set():
                self.asked.set()
                self.release.wait(DEADLINES["killed node"])
            self._headers()
            try:
                self.wfile.write(body)
            except OSError:  # the asking worker is gone with its node
                pass

        def _headers(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowImage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _with_slow_row(manifest: str, server: http.server.ThreadingHTTPServer, storage: Storage) -> str:
    """The manifest with a first row ``slow`` served by ``server``, next to it (its relative URIs
    resolve as before)."""
    table = pq.read_table(io.BytesIO(storage.read_bytes(manifest)))
    url = f"http://127.0.0.1:{server.server_address[1]}/slow.jpg"
    slow = pa.table({"image_id": ["slow"], "uri": [url]}).cast(table.schema)
    uri = join(parent(manifest), "killed.parquet")
    buf = io.BytesIO()
    pq.write_table(pa.concat_tables([slow, table]), buf)
    storage.write_bytes(uri, buf.getvalue())
    return uri


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

    def cfg(
        out: str, forward: bool = True, manifest: str | None = None, **kw: Any
    ) -> ImageJobConfig:
        return ImageJobConfig(
            "salient",
            manifest or conf["manifest"],
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

    # 5. the CPU node dies while it fetches an image: the manifest's first row is served by a
    # local HTTP server that holds its first answer until the kill, so that fetch is in flight on
    # the CPU node (the head has no CPU for tasks; the model node's is its actor's, up before any
    # task: see below). A new CPU node then joins (Cluster.add_node needs the main thread, so the
    # job runs in another), and Ray retries what was lost there. Last: nothing after it needs the
    # lost node.
    with deadline("killed node", timed_out):
        # Ray Data starts a pipeline's CPU tasks while its actors start, so a fetch task could
        # take the model node's one CPU before the actor does; here the pipeline waits for its
        # actor, so that its tasks can only go to the CPU node
        ray.data.DataContext.get_current().wait_for_min_actors_s = DEADLINES["killed node"]
        server = _slow_image_server(encode(product_image(IMAGES, (48, 40))))
        manifest = _with_slow_row(conf["manifest"], server, storage)
        out2 = join(conf["out"], "run2")
        before_tasks = _tasks()
        outcome: dict[str, Any] = {}

        def job() -> None:
            try:
                outcome["summary"] = run_image_job(cfg(out2, manifest=manifest))
            except Exception as e:  # failed clearly: a rerun must complete
                outcome["error"] = e

        runner = threading.Thread(target=job, daemon=True)
        runner.start()
        slow: Any = server.RequestHandlerClass
        asked = slow.asked.wait(DEADLINES["killed node"])
        cluster.remove_node(cpu_node, allow_graceful=False)
        before_end = not outcome
        logger.info("removed the CPU node (the slow image asked for: %s)", asked)
        slow.release.set()
        cluster, cpu2 = _add_node(cluster, **node_args("cpu2", num_cpus=CPU_NODE_CPUS))
        nodes["cpu2"] = cpu2.node_id
        runner.join()
        killed = {"asked_before_kill": asked, "before_end": before_end, "out": out2}
        if "error" in outcome:
            e = outcome["error"]
            logger.warning("the run that lost its CPU node failed: %s; running it again", e)
            killed["error"] = f"{type(e).__name__}: {e}"
            ray.shutdown()
            outcome["summary"] = run_image_job(cfg(out2, manifest=manifest))
            killed["rerun"] = True
        killed.update(rows=outcome["summary"].rows, ok=outcome["summary"].ok)
        server.shutdown()
        tasks = _since(_tasks(), before_tasks)
        killed["retried"] = sorted(t["name"] for t in tasks.values() if t["attempts"] > 1)
        killed["caches"] = caches_now()
        result["killed"] = killed
    save("killed node")

    ray.shutdown()
    cluster.shutdown()
    save("done")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
