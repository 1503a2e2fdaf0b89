"""Portrait matting: ModelScope's ``damo/cv_unet_image-matting`` TensorFlow graph, run by ONNX Runtime.

Reference: ModelScope ``modelscope/pipelines/cv/image_matting_pipeline.py`` (a TF1 session on the
frozen graph ``tf_graph.pb``; ``input_image:0`` float RGB (H, W, 3) 0..255 → ``output_png:0`` uint8
RGBA (H, W, 4)). The model card describes a U-Net; no PyTorch source exists, so the graph itself is
converted once to ONNX (``vbatch matting convert --model-dir DIR``, :mod:`vbatch.models.matting.convert`,
needs the ``convert`` extra) and run with ONNX Runtime on the workers.

Public API::

    load(model_dir, device=None, threads=None, max_side=2000) -> MattingPredictor
    load_transforms(model_dir, max_side=2000) -> MattingTransforms
    write_demo_model_dir(path) -> Path                       # ONNX stand-in for `vbatch demo`
    alpha_of(rgba), cutout(image, alpha), composite(rgba, background)

Nothing here imports TensorFlow or tf2onnx (only :func:`vbatch.models.matting.convert.convert_graph` does,
when called), nor ``onnx`` (only :func:`write_demo_model_dir`).
"""

from __future__ import annotations

from pathlib import Path

from vbatch.models.matting.model import MATTING, MattingFiles, MattingPredictor, ModelDirError, load
from vbatch.models.matting.transforms import (
    MattingTransforms,
    alpha_of,
    composite,
    cutout,
    parse_color,
)


def load_transforms(model_dir: Path, max_side: int = MATTING.max_side) -> MattingTransforms:
    """CPU pre/post-processing; needs nothing from ``model_dir`` (the graph takes any size).

    ``max_side`` must equal the one given to :func:`load` for the same job.
    """
    return MattingTransforms(max_side=max_side)


def write_demo_model_dir(path: Path) -> Path:
    """A small ONNX matting model directory for ``vbatch demo`` (see :mod:`vbatch.models.matting.demo`)."""
    from vbatch.models.matting.demo import write_demo_model_dir as write

    return write(path)


__all__ = [
    "MATTING",
    "MattingFiles",
    "MattingPredictor",
    "MattingTransforms",
    "ModelDirError",
    "alpha_of",
    "composite",
    "cutout",
    "load",
    "load_transforms",
    "parse_color",
    "write_demo_model_dir",
]
