"""``segment`` on a Ray cluster of three nodes on one machine, against the S3 server.

The cluster runs in its own process (``tests/multinode_job.py``): this session already holds a
local Ray instance. A head, a CPU worker and a "model" worker carrying the custom resource
``model_node`` (standing in for the GPU nodes; the job's ``--actor-resource model_node=1`` pins the
model actors to it). Checked: local paths refused at once, the driver's credentials reaching the
workers only with ``--forward-s3-env``, one row per manifest row, the model actors only on the
model node, one model-directory download per node, and a run that loses the CPU node mid-way.
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
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vbatch.jobs import runtime
from vbatch.jobs.demo_data import encode, product_image
from vbatch.jobs.publish import read_table
from vbatch.operators.storage import join

IMAGES = 24
SCRIPT = Path(__file__).with_name("multinode_job.py")
#: the whole scenario: three node start-ups, three jobs (minutes on a quiet 2-core machine)
TIMEOUT_S = 1500


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


def _inputs(storage, bucket: str, tmp_path: Path) -> tuple[str, str, list[str]]:
    from vbatch.models.salient.config import SENET_TINY
    from vbatch.models.salient.modeldir import write_random_model_dir

    ids = [f"img-{i:02d}" for i in range(IMAGES)]
    for i, image_id in enumerate(ids):
        storage.write_bytes(
            join(bucket, "in", f"{image_id}.jpg"), encode(product_image(i, (48, 40)))
        )
    buf = io.BytesIO()
    pq.write_table(pa.table({"image_id": ids, "uri": [f"{i}.jpg" for i in ids]}), buf)
    manifest = join(bucket, "in", "manifest.parquet")
    storage.write_bytes(manifest, buf.getvalue())
    local = write_random_model_dir(tmp_path / "salient", SENET_TINY, norm_size=(32, 32))
    model_dir = join(bucket, "models", "salient")
    for f in local.iterdir():
        storage.put_file(f, join(model_dir, f.name))
    return manifest, model_dir, ids


@pytest.mark.multinode
def test_segment_on_three_nodes(s3_server, tmp_path: Path) -> None:
    storage = s3_server.storage()
    bucket = s3_server.new_bucket()
    manifest, model_dir, ids = _inputs(storage, bucket, tmp_path)
    conf = {
        "endpoint": s3_server.endpoint,
        "manifest": manifest,
        "model_dir": model_dir,
        "out": join(bucket, "out"),
        "work": str(tmp_path),
    }
    (tmp_path / "conf.json").write_text(json.dumps(conf))
    result_path = tmp_path / "result.json"
    # a private Ray temp dir: a Cluster's head writes its address to <temp>/ray/ray_current_cluster,
    # and every plain ray.init() on the machine (other test sessions) would join it from /tmp/ray
    ray_tmp = tempfile.mkdtemp(prefix="vbmn-", dir="/tmp")  # short: socket paths have a limit
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_ADDRESS": ""}
    log_path = tmp_path / "multinode.log"
    try:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, str(SCRIPT), str(tmp_path / "conf.json"), str(result_path)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                proc.wait(TIMEOUT_S)
            except subprocess.TimeoutExpired:
                # the script's own process group: its Ray nodes go with it
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    progress = json.loads(result_path.read_text()) if result_path.exists() else {}
    assert proc.returncode == 0, (
        f"exit {proc.returncode} after step {progress.get('last_step')!r}; log "
        f"{log_path}:\n{log_path.read_text(errors='replace')[-6000:]}"
    )
    result = progress
    assert result["last_step"] == "done"

    # local paths: refused before anything ran, naming the option and object storage
    assert result["local_out"] and "--out" in result["local_out"]
    assert "use object storage" in result["local_out"] and "3 nodes" in result["local_out"]
    assert not result["local_out_written"]
    # the nodes have no credentials of their own: only --forward-s3-env brings the driver's
    assert result["probe_without"]["aws"] == []
    assert "AWS_ACCESS_KEY_ID" in result["probe_with"]["aws"]
    assert result["probe_with"]["node"] == result["nodes"]["model"]

    # every manifest row exactly once, in both runs (the second lost its CPU node)
    for run in ("run1", "run2"):
        table = read_table(result[run]["out"], storage)
        assert sorted(table.column("image_id").to_pylist()) == ids, run
        assert set(table.column("status").to_pylist()) == {"ok"}, run
        assert result[run]["rows"] == IMAGES and result[run]["ok"] == IMAGES
    assert result["killed_before_end"], "the CPU node was not removed while the job ran"
    if result["run2"]["error"]:  # failed clearly, and the rerun completed
        assert result["run2"].get("rerun")

    # model actors ran on the model node only
    assert result["actor_nodes_run1"] and set(result["actor_nodes_all"]) == {
        result["nodes"]["model"]
    }
    # one download of the model directory, into the model node's cache, reused by the second run;
    # the driver checks its own copy; the CPU stages never need one
    for caches in (result["caches_run1"], result["caches_end"]):
        assert len(caches["model"]) == 1 and len(caches["driver"]) == 1
        assert caches["cpu"] == [] and caches["head"] == []
    assert result["caches_end"]["model"] == result["caches_run1"]["model"]


def test_cluster_options_reach_the_job_config() -> None:
    from vbatch.jobs.cli import _image_job_config, build_parser

    base = ["segment", "--task", "salient", "--manifest", "s3://b/m", "--model-dir", "s3://b/d"]
    base += ["--out", "s3://b/o"]
    args = build_parser().parse_args(base)
    cfg = _image_job_config(args, "salient")
    assert cfg.forward_s3_env is False and cfg.actor_resources is None  # nothing implicit
    more = ["--forward-s3-env", "--actor-resource", "gpu_node=1", "--actor-resource", "big=0.5"]
    cfg = _image_job_config(build_parser().parse_args(base + more), "salient")
    assert cfg.forward_s3_env is True and cfg.actor_resources == {"gpu_node": 1.0, "big": 0.5}
    assert runtime.actor_resources(cfg.actor_resources) == {
        "resources": {"gpu_node": 1.0, "big": 0.5}
    }
    assert runtime.actor_resources(None) == {}
    for bad in ("gpu_node", "=1", "gpu_node=0", "gpu_node=x"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([*base, "--actor-resource", bad])
