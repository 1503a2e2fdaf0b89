"""The shipped cluster.yaml is a valid Ray cluster config and, read literally, makes a nightly
segment run request GPU actors that its autoscaler can satisfy."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_schema_check() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    # prepare_config fills in the defaults `ray up` fills in (the check refuses a config without
    # them, e.g. cluster_synced_files) and does not touch the fields cluster.yaml sets
    validate_config(prepare_config(_config()))


def test_cluster_yaml_gets_gpu_actors_before_any_gpu_node_is_up(ray_session, monkeypatch) -> None:
    import vbatch.jobs.runtime as rt

    types = _config()["available_node_types"]
    max_gpus = sum(t.get("resources", {}).get("GPU", 0) * t["max_workers"] for t in types.values())
    assert max_gpus >= 1, "no node type the autoscaler can start has a GPU"
    assert all(
        t.get("min_workers", 0) == 0 for t in types.values() if t.get("resources", {}).get("GPU")
    )
    # what the autoscaler publishes for these node types, before a GPU node has started
    monkeypatch.setattr(rt, "autoscaler_max_gpus", lambda: max_gpus)
    monkeypatch.setattr(rt, "cluster_gpus", lambda: 0)
    res = rt.decide_resources("salient")  # --device auto
    assert res.device == "cuda" and res.gpus_per_actor == 1.0
    assert res.pool_size() == (1, max_gpus)
