"""Portrait matting: ModelScope's ``damo/cv_unet_image-matting`` TensorFlow graph, run by ONNX Runtime.

Reference: ModelScope ``modelscope/pipelines/cv/image_matting_pipeline.py`` (a TF1 session on the
frozen graph ``tf_graph.pb``; ``input_image:0`` float RGB (H, W, 3) 0..255 → ``output_png:0`` uint8
RGBA (H, W, 4)). The model card describes a U-Net; no PyTorch source exists, so the graph itself is
converted once to ONNX (``vbatch matting convert --model-dir DIR``, :mod:`vbatch.models.matting.convert`,
needs the ``convert`` extra) and run with ONNX Runtime on the workers.

Public API::

    load(model_dir, device=None, *, threads=None, max_side=2000) -> MattingPredictor
    load_transforms(model_dir, *, max_side=2000) -> MattingTransforms
    alpha_of(rgba), cutout(image, alpha), composite(rgba, background)

Files follow ``models/README.md``; ``model.py`` holds the ONNX Runtime session (there is no
``nn.Module``) and ``modeldir.write_random_model_dir`` writes the ONNX demo graph. Nothing here imports
TensorFlow or tf2onnx (only :func:`vbatch.models.matting.convert.convert_graph` does, when called),
nor ``onnx`` (only :mod:`vbatch.models.matting.modeldir`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vbatch.models.lazy import lazy_exports

if TYPE_CHECKING:
    from vbatch.models.matting.config import MATTING, MattingFiles
    from vbatch.models.matting.model import ModelDirError
    from vbatch.models.matting.predictor import MattingPredictor, load, load_transforms
    from vbatch.models.matting.transforms import (
        MattingTransforms,
        alpha_of,
        composite,
        cutout,
        parse_color,
    )

# imported on first use: the CPU stages import the transforms only (no torch), see models/lazy.py
__getattr__ = lazy_exports(
    __name__,
    {
        "vbatch.models.matting.config": ("MATTING", "MattingFiles"),
        "vbatch.models.matting.model": ("ModelDirError",),
        "vbatch.models.matting.predictor": ("MattingPredictor", "load", "load_transforms"),
        "vbatch.models.matting.transforms": (
            "MattingTransforms",
            "alpha_of",
            "composite",
            "cutout",
            "parse_color",
        ),
    },
)

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
]
