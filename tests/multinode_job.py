"""A multi-node scenario on one machine, run by ``tests/test_multinode.py`` in its own process.

A Ray cluster of a head and two worker raylets (``ray.cluster_utils.Cluster``): a CPU node and a
"model" node carrying the custom resource ``model_node`` that stands in for the GPU nodes. Each
node has its own ``VBATCH_CACHE`` and no S3 credentials of its own. The script runs ``segment`` on
it, against the S3 server whose endpoint it is given, and writes what it saw to a JSON file for the
test to check. Run in a subprocess because the test session already holds a local Ray instance.

Usage: ``python tests/multinode_job.py CONFIG.json RESULT.json``; the config holds ``endpoint``,
``manifest``, ``model_dir``, ``out`` (a prefix: the runs write below it), ``work`` (a local folder).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from vbatch.jobs.runtime import LocalPathOnClusterError
from vbatch.jobs.segment import ImageJobConfig, run_image_job
from vbatch.operators.storage import Storage, StorageOptions, join

logger = logging.getLogger("multinode")

#: node start-up on a loaded machine may miss Ray's fixed 30 s registration deadline: try again
START_ATTEMPTS = 4


def _add_node(cluster: Cluster | None, **args) -> tuple[Cluster, object]:
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


def _model_actor_nodes() -> list[str]:
    """Node ids of every model-stage actor the cluster ran (the GCS's actor table, alive or dead)."""
    from ray._private.state import actors

    return sorted(
        a["Address"]["NodeID"]
        for a in actors().values()
        if "ModelStage" in a.get("ActorClassName", "") or "MapWorker" in a.get("ActorClassName", "")
    )


@ray.remote(num_cpus=0)
def _env_probe() -> dict:
    return {
        "node": ray.get_runtime_context().get_node_id(),
        "aws": sorted(k for k in os.environ if k.startswith("AWS_")),
    }


def main(config_path: str, result_path: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    conf = json.loads(Path(config_path).read_text())
    work = Path(conf["work"])
    result: dict = {}

    def save(step: str) -> None:
        # after every step: a run cut short by the test's timeout still shows how far it got
        result["last_step"] = step
        Path(result_path).write_text(json.dumps(result, indent=1))
        logger.info("step done: %s", step)

    # the nodes get no credentials of their own: the driver's reach them only when forwarded
    aws = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("AWS_")}
    caches = {name: work / f"cache-{name}" for name in ("head", "cpu", "model", "driver")}
    cluster, _head = _add_node(None, num_cpus=1, env_vars={"VBATCH_CACHE": str(caches["head"])})
    cluster, cpu_node = _add_node(
        cluster, num_cpus=2, env_vars={"VBATCH_CACHE": str(caches["cpu"])}
    )
    cluster, model_node = _add_node(
        cluster,
        num_cpus=1,
        resources={"model_node": 1},
        env_vars={"VBATCH_CACHE": str(caches["model"])},
    )
    cluster.wait_for_nodes(timeout=300)
    os.environ.update(aws)
    os.environ["VBATCH_CACHE"] = str(caches["driver"])
    result["nodes"] = {"cpu": cpu_node.node_id, "model": model_node.node_id}
    save("cluster up")
    storage = Storage(StorageOptions(endpoint_url=conf["endpoint"]))

    def cfg(out: str, forward: bool = True, **kw) -> ImageJobConfig:
        return ImageJobConfig(
            "salient",
            conf["manifest"],
            conf["model_dir"],
            out,
            batch_size=2,
            rows_per_block=2,
            s3_endpoint=conf["endpoint"],
            address=cluster.address,
            forward_s3_env=forward,
            actor_resources={"model_node": 1},
            **kw,
        )

    # 1. without --forward-s3-env nothing reaches the workers; local paths are refused at once
    try:
        run_image_job(cfg(str(work / "local-out"), forward=False))
        result["local_out"] = None
    except LocalPathOnClusterError as e:
        result["local_out"] = str(e)
    result["probe_without"] = ray.get(
        _env_probe.options(resources={"model_node": 1}).remote(), timeout=300
    )
    result["local_out_written"] = (work / "local-out").exists()
    save("refusal and probe without forwarding")
    ray.shutdown()

    # 2. a plain run, credentials forwarded
    out1 = join(conf["out"], "run1")
    s1 = run_image_job(cfg(out1))
    result["run1"] = {"rows": s1.rows, "ok": s1.ok, "out": out1}
    result["probe_with"] = ray.get(
        _env_probe.options(resources={"model_node": 1}).remote(), timeout=300
    )
    result["actor_nodes_run1"] = _model_actor_nodes()
    result["caches_run1"] = {k: _model_dirs(v) for k, v in caches.items()}
    save("run 1")

    # 3. the CPU node dies mid-run (once the first masks are written)
    out2 = join(conf["out"], "run2")
    killed = threading.Event()

    def kill() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                if storage.list_files(join(out2, "masks")):
                    break
            except Exception:
                pass
            time.sleep(0.2)
        cluster.remove_node(cpu_node, allow_graceful=False)
        killed.set()
        logger.info("removed the CPU node")

    killer = threading.Thread(target=kill, daemon=True)
    killer.start()
    try:
        s2 = run_image_job(cfg(out2))
        result["run2"] = {"rows": s2.rows, "ok": s2.ok, "error": None}
    except Exception as e:  # failed clearly: a rerun must complete
        result["run2"] = {"error": f"{type(e).__name__}: {e}"}
        ray.shutdown()
        s2 = run_image_job(cfg(out2))
        result["run2"].update(rows=s2.rows, ok=s2.ok, rerun=True)
    result["run2"]["out"] = out2
    result["killed_before_end"] = killed.is_set()
    killer.join(timeout=5)
    result["actor_nodes_all"] = _model_actor_nodes()
    result["caches_end"] = {k: _model_dirs(v) for k, v in caches.items()}
    save("done")
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
