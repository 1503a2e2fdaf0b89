"""A small stand-in matting model directory written directly as ONNX, for tests and ``vbatch demo``.

Matting has no PyTorch weights to randomise: its :func:`write_random_model_dir` writes this fixed
demo graph instead (no TensorFlow needed); :func:`vbatch.models.matting.load` never imports this module.

It has the converted graph's interface (see :mod:`vbatch.models.matting.model`): input ``input_image``
float (H, W, 3) in 0..255 with dynamic H, W; output ``output_png`` (H, W, 4) uint8 RGBA whose RGB is
the input and whose alpha is a smooth, plausible matte: the colour distance of each pixel from the
image's mean colour (a plain backdrop is "background"), box-blurred and squashed by a sigmoid,

    alpha = 255 · σ((blur5×5(‖x − mean(x)‖₂) − 60) / 12)

It is not ModelScope's network and its mattes mean nothing; it exists so that the demo and the
pipeline tests exercise the real runtime path (ONNX Runtime, dynamic shapes, uint8 RGBA).
Needs the ``onnx`` package (only when writing the file).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from vbatch.models.fileio import atomic_write_bytes
from vbatch.models.matting.config import MATTING

logger = logging.getLogger(__name__)

#: colour distance (grey levels) at which the demo alpha is one half, and the sigmoid's width
DEMO_THRESHOLD, DEMO_WIDTH, DEMO_BLUR = 60.0, 12.0, 5
DEMO_OPSET = 17


def demo_alpha(image: np.ndarray) -> np.ndarray:
    """NumPy reference of the demo graph's alpha, before its float→uint8 cast.

    Args:
        image: (H, W, 3) RGB, any numeric dtype, 0..255.

    Returns:
        (H, W) float32 in [0, 255].
    """
    x = image.astype(np.float32)
    dist = np.sqrt(((x - x.mean(axis=(0, 1))) ** 2).sum(axis=-1))
    pad = DEMO_BLUR // 2
    padded = np.pad(dist, pad)
    ones = np.pad(np.ones_like(dist), pad)
    h, w = dist.shape
    acc = np.zeros_like(dist)
    cnt = np.zeros_like(dist)
    for dy in range(DEMO_BLUR):
        for dx in range(DEMO_BLUR):
            acc += padded[dy : dy + h, dx : dx + w]
            cnt += ones[dy : dy + h, dx : dx + w]
    blurred = acc / cnt  # average over the pixels inside the image (count_include_pad=0)
    return 255.0 / (1.0 + np.exp(-(blurred - DEMO_THRESHOLD) / DEMO_WIDTH))


def build_demo_onnx() -> bytes:
    """The demo graph as a serialised ONNX ``ModelProto``."""
    import onnx
    from onnx import TensorProto, helper

    k = DEMO_BLUR
    nodes = [
        # (H, W, 3) -> (1, 3, H, W)
        helper.make_node("Transpose", ["input_image"], ["chw"], perm=[2, 0, 1]),
        helper.make_node("Unsqueeze", ["chw", "axis0"], ["nchw"]),
        helper.make_node("ReduceMean", ["nchw"], ["mean"], axes=[2, 3], keepdims=1),
        helper.make_node("Sub", ["nchw", "mean"], ["centred"]),
        helper.make_node("ReduceSumSquare", ["centred"], ["sq"], axes=[1], keepdims=1),
        helper.make_node("Sqrt", ["sq"], ["dist"]),
        helper.make_node(
            "AveragePool",
            ["dist"],
            ["blur"],
            kernel_shape=[k, k],
            pads=[k // 2] * 4,
            count_include_pad=0,
        ),
        helper.make_node("Sub", ["blur", "threshold"], ["shifted"]),
        helper.make_node("Div", ["shifted", "width"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["a01"]),
        helper.make_node("Mul", ["a01", "full"], ["a255"]),
        # (1, 1, H, W) -> (H, W, 1)
        helper.make_node("Squeeze", ["a255", "axis0"], ["a_chw"]),
        helper.make_node("Transpose", ["a_chw"], ["a_hwc"], perm=[1, 2, 0]),
        helper.make_node("Concat", ["input_image", "a_hwc"], ["rgba_f"], axis=2),
        helper.make_node("Clip", ["rgba_f", "zero", "full"], ["rgba_c"]),
        helper.make_node("Cast", ["rgba_c"], ["output_png"], to=TensorProto.UINT8),
    ]
    initializers = [
        helper.make_tensor("axis0", TensorProto.INT64, [1], [0]),
        helper.make_tensor("threshold", TensorProto.FLOAT, [], [DEMO_THRESHOLD]),
        helper.make_tensor("width", TensorProto.FLOAT, [], [DEMO_WIDTH]),
        helper.make_tensor("full", TensorProto.FLOAT, [], [255.0]),
        helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
    ]
    graph = helper.make_graph(
        nodes,
        "matting_demo",
        [helper.make_tensor_value_info("input_image", TensorProto.FLOAT, ["height", "width", 3])],
        [helper.make_tensor_value_info("output_png", TensorProto.UINT8, ["height", "width", 4])],
        initializer=initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", DEMO_OPSET)],
        producer_name="vbatch-matting-demo",
    )
    # IR 8 (opset 17's) so that older onnxruntime builds open it too
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def write_random_model_dir(path: str | Path) -> Path:
    """Write a demo matting model directory (``model.onnx`` + ``onnx_meta.json``) at ``path``.

    Args:
        path: directory to create (or reuse).

    Returns:
        ``path``, loadable with ``models.load_model("matting", path)``.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path / MATTING.onnx_file, build_demo_onnx())
    meta = {
        "source": "demo",
        "note": "synthetic stand-in written by vbatch.models.matting.modeldir, not ModelScope's network",
        "opset": DEMO_OPSET,
        "input": "input_image",
        "output": "output_png",
    }
    atomic_write_bytes(path / MATTING.meta_file, (json.dumps(meta, indent=2) + "\n").encode())
    logger.info("wrote demo matting model to %s", path)
    return path
