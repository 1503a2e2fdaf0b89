"""``vbatch env``: what this installation and, with ``--address``, the Ray cluster can do.

Users paste it into bug reports, and the GPU check script starts with it. Every probe is guarded:
a missing or broken package is reported as such, never raised. The probes that import torch,
faiss and ONNX Runtime run in a child interpreter: the ``vbatch`` process itself stays light (the
CLI imports no framework), and a CUDA driver that crashes its process cannot take the report with
it.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import json
import platform
import subprocess
import sys
from typing import Any

#: distributions whose versions matter for vbatch's results and speed
_DISTS = (
    "vbatch",
    "torch",
    "torchvision",
    "timm",
    "transformers",
    "ray",
    "pyarrow",
    "numpy",
    "pillow",
    "opencv-python-headless",
    "decord",
    "s3fs",
    "faiss-cpu",
    "faiss-gpu",
    "onnxruntime",
    "onnxruntime-gpu",
)


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _probe(fn: Any) -> Any:
    try:
        return fn()
    except Exception as e:  # a broken install is a fact to report, not a crash
        return f"error: {type(e).__name__}: {e}"


def _torch() -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    return {
        "cuda_available": cuda,
        "cuda_version": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if cuda
        else [],
        "bf16_supported": bool(cuda and torch.cuda.is_bf16_supported()),
    }


def _faiss() -> dict[str, Any]:
    faiss = importlib.import_module("faiss")
    return {"version": faiss.__version__, "gpus": int(getattr(faiss, "get_num_gpus", lambda: 0)())}


def _onnxruntime() -> dict[str, Any]:
    ort = importlib.import_module("onnxruntime")
    return {"version": ort.__version__, "providers": ort.get_available_providers()}


def _cluster(address: str) -> dict[str, Any]:
    import ray

    from vbatch.jobs.runtime import ensure_ray

    ensure_ray(address)
    nodes = [
        {
            "node": n["NodeManagerAddress"],
            "alive": n["Alive"],
            "resources": {k: v for k, v in n["Resources"].items() if not k.startswith("node:")},
        }
        for n in ray.nodes()
    ]
    return {"address": address, "resources": ray.cluster_resources(), "nodes": nodes}


#: the probes that import a framework, run together in one child interpreter
_CHILD_PROBES = {"torch": _torch, "faiss": _faiss, "onnxruntime": _onnxruntime}
#: seconds the child may take (importing torch with CUDA on a loaded node takes tens of seconds)
CHILD_TIMEOUT = 300


def probe_frameworks() -> dict[str, Any]:
    """The framework probes, in this process (what the child interpreter runs)."""
    return {name: _probe(fn) for name, fn in _CHILD_PROBES.items()}


def _frameworks_in_child() -> dict[str, Any]:
    code = "import json; from vbatch.jobs.env import probe_frameworks; print(json.dumps(probe_frameworks(), default=str))"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        failed = f"error: the probe did not finish in {CHILD_TIMEOUT} s"
        return dict.fromkeys(_CHILD_PROBES, failed)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        failed = f"error: the probe process exited {proc.returncode}: {tail}"
        return dict.fromkeys(_CHILD_PROBES, failed)
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def collect_env(address: str | None = None) -> dict[str, Any]:
    """Versions, accelerators and, with ``address``, the cluster's nodes and resources."""
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {d: v for d in _DISTS if (v := _version(d)) is not None},
        **_frameworks_in_child(),
    }
    if address:
        env["cluster"] = _probe(lambda: _cluster(address))
    return env


def format_env(env: dict[str, Any]) -> str:
    """The report as aligned ``key: value`` lines."""
    lines = [f"python: {env['python']} ({env['platform']})"]
    lines += [f"{name}: {version}" for name, version in env["packages"].items()]
    for key in ("torch", "faiss", "onnxruntime"):
        value = env[key]
        if isinstance(value, dict):
            lines += [f"{key}.{k}: {v}" for k, v in value.items()]
        else:
            lines.append(f"{key}: {value}")
    cluster = env.get("cluster")
    if isinstance(cluster, dict):
        lines.append(f"cluster: {cluster['address']}, resources {cluster['resources']}")
        lines += [
            f"  node {n['node']} ({'alive' if n['alive'] else 'dead'}): {n['resources']}"
            for n in cluster["nodes"]
        ]
    elif cluster is not None:
        lines.append(f"cluster: {cluster}")
    return "\n".join(lines)
