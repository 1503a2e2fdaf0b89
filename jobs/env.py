"""``vbatch env``: what this installation and, with ``--address``, the Ray cluster can do.

Users paste it into bug reports, and the GPU check script starts with it. Every probe is guarded:
a missing or broken package is reported as such, never raised.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import platform
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


def collect_env(address: str | None = None) -> dict[str, Any]:
    """Versions, accelerators and, with ``address``, the cluster's nodes and resources."""
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {d: v for d in _DISTS if (v := _version(d)) is not None},
        "torch": _probe(_torch),
        "faiss": _probe(_faiss),
        "onnxruntime": _probe(_onnxruntime),
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
