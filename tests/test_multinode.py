"""vbatch on a Ray cluster of three nodes on one machine, against the S3 server.

The cluster runs in its own process (``tests/multinode_job.py``), started once for this module:
this session may already hold a local Ray instance. A head, a CPU worker and a "model" worker
carrying the custom resource ``model_node`` (standing in for the GPU nodes; the jobs'
``--actor-resource model_node=1`` pins the model actors to it). Checked, each in its own test on
the one run: local paths refused at once, the driver's credentials reaching the workers only with
``--forward-s3-env``; ``segment`` gives one row per manifest row, its model actors on the model
node only and its CPU stages as tasks of their own; ``vbatch reid search --manifest`` and
``vbatch video`` on the cluster; one model-directory download per node; a run that loses the CPU
node mid-way still gives every row exactly once.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vbatch.jobs import runtime
from vbatch.jobs.demo_data import encode, person_crop, product_image
from vbatch.jobs.publish import read_table
from vbatch.operators.storage import join

IMAGES = 24
SCRIPT = Path(__file__).with_name("multinode_job.py")
#: the whole scenario, past every step's own deadline (multinode_job.DEADLINES): a stuck script is
#: killed with its process group (its Ray nodes go with it)
TIMEOUT_S = 1500
#: reid: gallery crops, and the queries (a few gallery images and a missing one)
GALLERY = 12
QUERIES = [3, 7, 10]
#: video: frames of the one good clip (two windows of the model), and its query
VIDEO_FRAMES = 25
#: the Ray Data stages of segment that are CPU tasks (names of the functions they map)
CPU_STAGES = ("fetch_bytes", "decode_and_preprocess", "write_products")

pytestmark = pytest.mark.multinode


def test_local_paths_refused_on_several_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit level: the check counts alive nodes and names every local path (no Ray needed)."""
    nodes = [{"Alive": True}, {"Alive": True}, {"Alive": False}]
    monkeypatch.setattr(runtime.ray, "nodes", lambda: nodes)
    paths = {"--manifest": "/data/m.parquet", "--model-dir": "s3://b/m", "--out": "file:///o"}
    with pytest.raises(runtime.LocalPathOnClusterError) as err:
        runtime.refuse_local_paths_on_cluster(paths)
    message = str(err.value)
    assert "2 nodes" in message and "object storage" in message
    assert "--manifest /data/m.parquet" in message and "--out file:///o" in message
    assert "--model-dir" not in message
    runtime.refuse_local_paths_on_cluster({"--out": "s3://b/o", "--manifest": None})
    nodes[1]["Alive"] = False  # one node: local paths are that node's disk, and fine
    runtime.refuse_local_paths_on_cluster(paths)


def test_forwarded_variables_are_the_aws_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://store:9000")
    monkeypatch.setenv("VBATCH_NOT_FORWARDED", "1")
    env = runtime.s3_env_to_forward()
    assert env["AWS_ENDPOINT_URL"] == "http://store:9000"
    assert "AWS_ACCESS_KEY_ID" in env and "VBATCH_NOT_FORWARDED" not in env


def test_cluster_options_reach_the_job_config() -> None:
    from vbatch.jobs.cli import build_parser
    from vbatch.jobs.cli.segment import image_job_config

    base = ["segment", "--task", "salient", "--manifest", "s3://b/m", "--model-dir", "s3://b/d"]
    base += ["--out", "s3://b/o"]
    args = build_parser().parse_args(base)
    cfg = image_job_config(args, "salient")
    assert cfg.forward_s3_env is False and cfg.actor_resources is None  # nothing implicit
    more = ["--forward-s3-env", "--actor-resource", "gpu_node=1", "--actor-resource", "big=0.5"]
    cfg = image_job_config(build_parser().parse_args(base + more), "salient")
    assert cfg.forward_s3_env is True and cfg.actor_resources == {"gpu_node": 1.0, "big": 0.5}
    assert runtime.actor_resources(cfg.actor_resources) == {
        "resources": {"gpu_node": 1.0, "big": 0.5}
    }
    assert runtime.actor_resources(None) == {}
    for bad in ("gpu_node", "=1", "gpu_node=0", "gpu_node=x"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([*base, "--actor-resource", bad])


# -- the cluster run ------------------------------------------------------------------------------


@dataclass
class ClusterRun:
    """What the script saw (its result file), and where to look when a step is missing."""

    result: dict[str, Any]
    returncode: int
    seconds: float
    log: Path
    ray_logs: str
    conf: dict[str, Any]
    storage: Any
    ids: list[str]

    def step(self, name: str) -> dict[str, Any]:
        """The result, once the script got through step ``name``; else fail saying why."""
        if name in self.result.get("steps", []):
            return self.result
        timed_out = self.result.get("timed_out")
        pytest.fail(
            f"the cluster script never finished step {name!r}: exit {self.returncode} after "
            f"{self.seconds:.0f} s, steps done {self.result.get('steps')}, "
            f"{'deadline passed in ' + repr(timed_out) if timed_out else 'no step timed out'}\n"
            f"--- script log {self.log} (tail):\n{self.log.read_text(errors='replace')[-6000:]}\n"
            f"--- Ray logs (tails):\n{self.ray_logs}"
        )


def _ray_log_tails(ray_tmp: str, chars: int = 1500) -> str:
    """The end of the Ray logs that say why a node or a worker failed: raylets, GCS, and the
    worker logs with a traceback."""
    logs = Path(ray_tmp, "ray", "session_latest", "logs")
    if not logs.is_dir():
        return f"(no Ray logs under {ray_tmp})"
    picked = sorted(logs.glob("raylet*.out")) + sorted(logs.glob("gcs_server.out"))
    workers = [p for p in logs.glob("worker-*.err") if b"Traceback" in p.read_bytes()]
    picked += sorted(workers, key=lambda p: p.stat().st_mtime)[-3:]
    return "\n".join(f"== {p.name}:\n{p.read_text(errors='replace')[-chars:]}" for p in picked)


def _segment_inputs(storage, bucket: str, tmp: Path) -> tuple[str, str, list[str]]:
    from vbatch.models.salient.config import SENET_TINY
    from vbatch.models.salient.modeldir import write_random_model_dir

    ids = [f"img-{i:02d}" for i in range(IMAGES)]
    for i, image_id in enumerate(ids):
        storage.write_bytes(
            join(bucket, "in", f"{image_id}.jpg"), encode(product_image(i, (48, 40)))
        )
    manifest = join(bucket, "in", "manifest.parquet")
    _write_parquet(storage, manifest, {"image_id": ids, "uri": [f"{i}.jpg" for i in ids]})
    local = write_random_model_dir(tmp / "salient", SENET_TINY, norm_size=(32, 32))
    model_dir = join(bucket, "models", "salient")
    _upload_dir(storage, local, model_dir)
    return manifest, model_dir, ids


def _reid_inputs(storage, bucket: str, tmp: Path) -> dict[str, str]:
    """A tiny re-ID model, a gallery index of its embeddings of GALLERY crops (built here, without
    Ray), and a manifest of query images: some gallery crops and a missing file."""
    from tests.index_data import write_embeddings
    from vbatch.models import load_model, model_version
    from vbatch.models.reid import TINY
    from vbatch.models.reid.modeldir import write_random_model_dir
    from vbatch.operators.decode import decode_image
    from vbatch.operators.index import build_index

    local = write_random_model_dir(tmp / "reid" / "model", config=TINY)
    model_dir = join(bucket, "models", "reid")
    _upload_dir(storage, local, model_dir)
    crops = [encode(person_crop(i, i % 4), quality=95) for i in range(GALLERY)]
    ids = [f"g-{i:06d}" for i in range(GALLERY)]  # write_embeddings' names
    for image_id, data in zip(ids, crops, strict=True):
        storage.write_bytes(join(bucket, "reid", "crops", f"{image_id}.jpg"), data)
    raw = load_model("reid", local).predict([decode_image(c) for c in crops])
    vectors = np.stack([v / np.linalg.norm(v) for v in raw]).astype(np.float32)
    write_embeddings(
        tmp / "reid" / "gallery", vectors, prefix="g", model_version=model_version("reid", local)
    )
    index = join(bucket, "reid", "index")
    build_index(str(tmp / "reid" / "gallery"), index, storage)
    queries = [ids[i] for i in QUERIES] + ["gone"]
    manifest = join(bucket, "reid", "queries.parquet")
    uris = [f"crops/{q}.jpg" for q in queries]
    _write_parquet(storage, manifest, {"image_id": queries, "uri": uris})
    return {"index": index, "manifest": manifest, "model_dir": model_dir}


def _video_inputs(storage, bucket: str, tmp: Path) -> dict[str, str]:
    """A tiny MTTR model and a manifest of one short clip and one missing video."""
    from tests.test_video_job import synthetic_video
    from vbatch.models.rvos import TINY
    from vbatch.models.rvos.modeldir import write_random_model_dir

    local = write_random_model_dir(tmp / "rvos", config=TINY)
    model_dir = join(bucket, "models", "rvos")
    _upload_dir(storage, local, model_dir)
    clip = synthetic_video(tmp / "videos" / "walk.mp4", VIDEO_FRAMES, seed=0)
    storage.put_file(clip, join(bucket, "video", "walk.mp4"))
    manifest = join(bucket, "video", "manifest.parquet")
    _write_parquet(
        storage,
        manifest,
        {
            "video_id": ["walk", "missing"],
            "uri": ["walk.mp4", "gone.mp4"],
            "queries": pa.array([["a red ball"], ["a dog"]], pa.list_(pa.string())),
        },
    )
    return {"manifest": manifest, "model_dir": model_dir}


def _write_parquet(storage, uri: str, columns: dict[str, Any]) -> None:
    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf)
    storage.write_bytes(uri, buf.getvalue())


def _upload_dir(storage, local: Path, uri: str) -> None:
    for f in local.rglob("*"):
        if f.is_file():
            storage.put_file(f, join(uri, str(f.relative_to(local))))


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("multinode")
    storage = s3_server.storage()
    bucket = s3_server.new_bucket()
    manifest, model_dir, ids = _segment_inputs(storage, bucket, tmp)
    conf = {
        "endpoint": s3_server.endpoint,
        "manifest": manifest,
        "model_dir": model_dir,
        "out": join(bucket, "out"),
        "work": str(tmp),
        "reid": {**_reid_inputs(storage, bucket, tmp), "out": join(bucket, "reid", "hits")},
        "video": {**_video_inputs(storage, bucket, tmp), "out": join(bucket, "video", "out")},
    }
    (tmp / "conf.json").write_text(json.dumps(conf))
    result_path = tmp / "result.json"
    # a private Ray temp dir: a Cluster's head writes its address to <temp>/ray/ray_current_cluster,
    # and every plain ray.init() on the machine (other test sessions) would join it from /tmp/ray
    ray_tmp = tempfile.mkdtemp(prefix="vbmn-", dir="/tmp")  # short: socket paths have a limit
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_ADDRESS": ""}
    log_path = tmp / "multinode.log"
    started = time.monotonic()
    try:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, str(SCRIPT), str(tmp / "conf.json"), str(result_path)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                proc.wait(TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        try:  # whatever the script left (a node it could not stop)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        result = json.loads(result_path.read_text()) if result_path.exists() else {}
        ray_logs = "" if proc.returncode == 0 else _ray_log_tails(ray_tmp)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    yield ClusterRun(
        result, proc.returncode, time.monotonic() - started, log_path, ray_logs, conf, storage, ids
    )


def test_cluster_refuses_local_paths_and_forwards_credentials_only_when_asked(cluster) -> None:
    result = cluster.step("refusal and probe without forwarding")
    # local paths: refused before anything ran, naming the option and object storage
    assert result["local_out"] and "--out" in result["local_out"]
    assert "use object storage" in result["local_out"] and "3 nodes" in result["local_out"]
    assert not result["local_out_written"]
    # the nodes have no credentials of their own: only --forward-s3-env brings the driver's
    assert result["probe_without"]["aws"] == []
    result = cluster.step("segment")
    assert "AWS_ACCESS_KEY_ID" in result["probe_with"]["aws"]
    assert result["probe_with"]["node"] == result["nodes"]["model"]


def test_segment_on_three_nodes_one_row_per_manifest_row(cluster) -> None:
    run = cluster.step("segment")["segment"]
    table = read_table(run["out"], cluster.storage)
    assert sorted(table.column("image_id").to_pylist()) == cluster.ids
    assert set(table.column("status").to_pylist()) == {"ok"}
    assert run["rows"] == IMAGES and run["ok"] == IMAGES


def _stage_nodes(tasks: dict[str, dict], stage: str) -> list[str]:
    return sorted({n for t in tasks.values() if stage in (t["name"] or "") for n in t["nodes"]})


def test_segment_places_model_actors_on_the_model_node_and_cpu_stages_in_tasks(cluster) -> None:
    """What Ray recorded (its actor table and task events): the model actors, and every call into
    them, only where ``--actor-resource`` sends them; the CPU stages as tasks of their own, never
    fused into the model actor, run on the CPU nodes.

    Where a CPU stage runs is Ray's choice, by design: those tasks ask for CPUs only, so that on a
    real cluster they also use a GPU node's spare cores. Here the head has no CPU for tasks and the
    model node's one CPU is its actor's while the pipeline runs, so fetch/decode/write go to the
    CPU node; the manifest's read tasks, which run before the actor exists, were seen on the model
    node too."""
    result = cluster.step("segment")
    nodes, run = result["nodes"], result["segment"]
    models = [a for a in run["actors"].values() if "ModelStage" in a["repr"]]
    assert models, run["actors"]
    assert {a["node"] for a in models} == {nodes["model"]}
    assert all(a["resources"].get("model_node") == 1.0 for a in models)
    # every call into the model actor ran there
    calls = [t for t in run["tasks"].values() if "ModelStage)).submit" in (t["name"] or "")]
    assert calls and {n for t in calls for n in t["nodes"]} == {nodes["model"]}
    for stage in CPU_STAGES:
        ran = [t for t in run["tasks"].values() if stage in (t["name"] or "")]
        assert ran and {t["type"] for t in ran} == {"NORMAL_TASK"}, (stage, ran)
        assert "ModelStage" not in str([t["name"] for t in ran])  # not fused into the actor
        where = set(_stage_nodes(run["tasks"], stage))
        assert nodes["cpu"] in where and where <= {nodes["cpu"], nodes["model"]}, (stage, where)


def test_each_node_downloads_a_model_directory_once(cluster) -> None:
    """One download of each model directory into the model node's cache, reused by later runs;
    the driver checks its own copy; the CPU nodes never need one."""
    first = cluster.step("segment")["segment"]["caches"]
    assert len(first["model"]) == 1 and len(first["driver"]) == 1
    assert first["cpu"] == [] and first["head"] == []
    end = cluster.step("video")["caches_end"]
    # segment's, reid's and video's, once each
    assert len(end["model"]) == 3 and first["model"][0] in end["model"]
    assert len(end["driver"]) == 3
    assert end["cpu"] == end["head"] == []
    # the run that lost its CPU node reused segment's copy; the new CPU node needed none
    killed = cluster.step("killed node")["killed"]["caches"]
    assert killed["model"] == end["model"] and killed["cpu"] == killed["cpu2"] == []


def test_killed_cpu_node_still_gives_every_row_once(cluster) -> None:
    """The CPU node is killed while it fetches the first row's image (a local HTTP server holds
    that answer until the kill); a new CPU node joins, and Ray retries the lost fetch there."""
    run = cluster.step("killed node")["killed"]
    assert run["asked_before_kill"], "the slow image was never asked for: nothing was in flight"
    assert run["before_end"], "the CPU node was not removed while the job ran"
    assert any("fetch_bytes" in name for name in run["retried"]), run["retried"]
    if run.get("error"):  # failed clearly, and the rerun completed
        assert run.get("rerun")
    table = read_table(run["out"], cluster.storage)
    assert sorted(table.column("image_id").to_pylist()) == sorted([*cluster.ids, "slow"])
    assert set(table.column("status").to_pylist()) == {"ok"}
    assert run["rows"] == IMAGES + 1 and run["ok"] == IMAGES + 1


def test_reid_search_manifest_on_the_cluster(cluster) -> None:
    result = cluster.step("reid search")
    run, conf = result["reid"], cluster.conf["reid"]
    assert run["exit"] == 0
    rows = read_table(conf["out"], cluster.storage).to_pylist()
    expected = [f"g-{i:06d}" for i in QUERIES]
    assert sorted({r["query_id"] for r in rows}) == sorted([*expected, "gone"])
    for q in expected:  # k = 2 hits each, the first the query itself
        hits = sorted((r for r in rows if r["query_id"] == q), key=lambda r: r["rank"])
        assert [h["rank"] for h in hits] == [1, 2] and hits[0]["image_id"] == q
        assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    gone = [r for r in rows if r["query_id"] == "gone"]
    assert len(gone) == 1 and gone[0]["status"] == "error" and "not found" in gone[0]["error"]
    embedders = [a for a in run["actors"].values() if "ModelStage" in a["repr"]]
    assert embedders and {a["node"] for a in embedders} == {result["nodes"]["model"]}


def test_video_on_the_cluster_one_row_per_video_query_and_frame(cluster) -> None:
    result = cluster.step("video")
    run, conf = result["video"], cluster.conf["video"]
    assert run["exit"] == 0
    rows = read_table(join(conf["out"], "results"), cluster.storage).to_pylist()
    walk = [r for r in rows if r["video_id"] == "walk"]
    assert sorted(r["frame_index"] for r in walk) == list(range(VIDEO_FRAMES))  # each once
    assert {(r["status"], r["query_index"]) for r in walk} == {("ok", 0)}
    missing = [r for r in rows if r["video_id"] == "missing"]
    assert len(missing) == 1 and missing[0]["status"] == "error"
    assert sorted({r["manifest_row"] for r in rows}) == [0, 1]  # every manifest row
    models = [a for a in run["actors"].values() if "ModelStage" in a["repr"]]
    assert models and {a["node"] for a in models} == {result["nodes"]["model"]}
