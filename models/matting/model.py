"""ModelScope's portrait matting graph, run by ONNX Runtime.

Reference: ModelScope ``damo/cv_unet_image-matting`` (a U-Net portrait matting network, distributed
only as a TensorFlow 1 frozen graph ``tf_graph.pb``) and its pipeline
``modelscope/pipelines/cv/image_matting_pipeline.py``: one RGB image of any size is fed as float
(H, W, 3) in 0..255 at ``input_image:0``; ``output_png:0`` is (H, W, 4) uint8 RGBA, the alpha in the
fourth channel (the pipeline flips it to BGRA only to ``cv2.imwrite`` it). No PyTorch source of the
network exists, so the faithful route is the graph itself: ``vbatch matting convert`` turns it once
into ``model.onnx`` with tf2onnx (:mod:`vbatch.models.matting.convert`, checked against TensorFlow), and
workers run that file with ONNX Runtime — workers never import TensorFlow.

The graph takes one image per call at its own size, so :meth:`MattingPredictor.forward` loops the
session over its list. Images whose long side exceeds ``max_side`` (2000, the model card's working
range) are matted downscaled and the alpha is resized back (:mod:`vbatch.models.matting.transforms`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from vbatch.models.checkpoint import CheckpointError, file_version
from vbatch.models.matting.config import MATTING

logger = logging.getLogger(__name__)


class ModelDirError(CheckpointError):
    """The matting model directory is missing ``model.onnx``, holds a stale or unreadable one, …"""


def convert_command(model_dir: Path) -> str:
    return f"vbatch matting convert --model-dir {model_dir}"


def read_meta(model_dir: Path) -> dict:
    """``onnx_meta.json`` as a dict (empty when absent); raises :class:`ModelDirError` if unreadable."""
    path = Path(model_dir) / MATTING.meta_file
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelDirError(f"{path}: unreadable conversion metadata ({e})") from e
    if not isinstance(meta, dict):
        raise ModelDirError(f"{path}: expected a JSON object")
    return meta


def resolve_onnx(model_dir: Path) -> tuple[Path, str]:
    """Find the ONNX file of a matting model directory and its ``model_version``.

    Args:
        model_dir: a ModelScope ``cv_unet_image-matting`` directory after ``vbatch matting convert``
            (``tf_graph.pb`` + ``model.onnx`` + ``onnx_meta.json``), or a directory holding only
            ``model.onnx`` (the demo model).

    Returns:
        ``(onnx_path, model_version)``: the version is the short hash of ``tf_graph.pb`` when the
        graph is there (the same figure whichever machine converted it), else of ``model.onnx``.

    Raises:
        ModelDirError: no ``model.onnx`` (the message names the convert command), or a
            ``model.onnx`` converted from another ``tf_graph.pb`` than the one beside it.
    """
    model_dir = Path(model_dir)
    onnx_path = model_dir / MATTING.onnx_file
    graph_path = model_dir / MATTING.graph_file
    if not model_dir.is_dir():
        raise ModelDirError(f"matting model directory not found: {model_dir}")
    if not onnx_path.is_file():
        if graph_path.is_file():
            raise ModelDirError(
                f"{model_dir} holds ModelScope's TensorFlow graph {MATTING.graph_file} but no "
                f"{MATTING.onnx_file}; convert it once (needs the convert extra, not the workers): "
                f"{convert_command(model_dir)}"
            )
        raise ModelDirError(
            f"{model_dir} is not a matting model directory: neither {MATTING.onnx_file} nor "
            f"{MATTING.graph_file} found"
        )
    if not graph_path.is_file():
        return onnx_path, file_version(onnx_path)
    version = file_version(graph_path)
    source = read_meta(model_dir).get("source_sha256")
    if source is None:
        raise ModelDirError(
            f"{onnx_path} has no {MATTING.meta_file} recording which graph it was converted from; "
            f"re-run {convert_command(model_dir)} --force"
        )
    if not str(source).startswith(version):
        raise ModelDirError(
            f"{onnx_path} was converted from another {MATTING.graph_file} (sha256 {str(source)[:12]}, "
            f"now {version}); re-run {convert_command(model_dir)} --force"
        )
    return onnx_path, version


def session_options(threads: int | None) -> ort.SessionOptions:
    """ONNX Runtime options for one actor.

    Args:
        threads: intra-op threads (the CPUs the actor was given); ``None`` lets ORT use every core,
            which oversubscribes the machine when several actors share it.
    """
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # One image per run: nothing to overlap between independent branches.
    so.inter_op_num_threads = 1
    if threads is not None:
        so.intra_op_num_threads = int(threads)
    # Reuses the allocation plan between runs of the same shape (frequent: photos come in a
    # handful of sizes); a new shape just makes a new plan.
    so.enable_mem_pattern = True
    so.enable_cpu_mem_arena = True
    so.log_severity_level = 3
    return so


def providers_for(device: torch.device) -> list:
    """ORT execution providers for ``device``; CUDA only when asked for and available."""
    if device.type == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            cuda = {
                "device_id": device.index or 0,
                # Shapes change from image to image: an exhaustive cuDNN search per new shape
                # would cost more than it saves.
                "cudnn_conv_algo_search": "HEURISTIC",
                "arena_extend_strategy": "kSameAsRequested",
            }
            return [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
        logger.warning(
            "device %s requested but ONNX Runtime has no CUDAExecutionProvider (install "
            "onnxruntime-gpu, the gpu extra); matting runs on the CPU",
            device,
        )
    return ["CPUExecutionProvider"]


ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
}
