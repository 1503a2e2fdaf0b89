"""The KubeRay manifests in deploy/kuberay/ parse, keep the schedule's promises, and their
entrypoints are valid `vbatch` command lines (run through vbatch's own parser)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from vbatch.jobs.cli import build_parser

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "kuberay"
MANIFESTS = sorted(DEPLOY.glob("*.yaml"))


def _rayjob_spec(doc: dict) -> dict:
    return doc["spec"]["jobTemplate"] if doc["kind"] == "RayCronJob" else doc["spec"]


def test_there_is_a_rayjob_and_a_raycronjob() -> None:
    kinds = sorted(yaml.safe_load(p.read_text())["kind"] for p in MANIFESTS)
    assert kinds == ["RayCronJob", "RayJob"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_entrypoint_is_a_valid_vbatch_command(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    assert doc["apiVersion"] == "ray.io/v1"
    spec = _rayjob_spec(doc)
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "vbatch"
    args = build_parser().parse_args(argv[1:])  # SystemExit(2) if it drifted from the CLI
    assert args.command == "segment" and args.summary_json == "-"
    assert args.manifest.startswith("s3://") and args.out.startswith("s3://")
    assert spec["shutdownAfterJobFinishes"] is True


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_cluster_has_gpu_workers_and_s3_credentials_from_a_secret(path: Path) -> None:
    cluster = _rayjob_spec(yaml.safe_load(path.read_text()))["rayClusterSpec"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(gpu["nvidia.com/gpu"]) >= 1
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in groups.values()]
    for pod in pods:
        env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[key]["valueFrom"]["secretKeyRef"]["name"] == "vbatch-s3"
            assert "value" not in env[key]  # never a literal credential


def test_cron_schedule_is_zoned_and_never_overlaps() -> None:
    (cron,) = [
        d for d in (yaml.safe_load(p.read_text()) for p in MANIFESTS) if d["kind"] == "RayCronJob"
    ]
    spec = cron["spec"]
    assert len(spec["schedule"].split()) == 5 and spec["timeZone"]
    assert spec["concurrencyPolicy"] == "Forbid"
    rayjob = next(
        d for d in (yaml.safe_load(p.read_text()) for p in MANIFESTS) if d["kind"] == "RayJob"
    )
    assert spec["jobTemplate"] == rayjob["spec"]  # the two cannot drift apart either
