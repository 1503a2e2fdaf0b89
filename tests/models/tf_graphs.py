"""Small TensorFlow frozen graphs shaped like ModelScope's matting graph, for tests.

ModelScope's ``damo/cv_unet_image-matting`` ships ``tf_graph.pb``: a TF1 frozen graph fed at
``input_image:0`` with one RGB image as float (H, W, 3) in 0..255, any size, and fetched at
``output_png:0`` as (H, W, 4) uint8 RGBA (see ``modelscope/pipelines/cv/image_matting_pipeline.py``).
No weights can be downloaded, so tests build graphs with the same tensor names, dtypes and shape
semantics: a tiny U-Net-like stack (convolution, a stride-2 pooling, a bilinear resize back to the
input's dynamic size, a skip concatenation) gives a sigmoid alpha that is concatenated with the input
and cast to uint8, as the real graph's output is.

TensorFlow is imported only through :func:`import_tensorflow`, which imports torch (and triton's
native library) first: TensorFlow's LLVM loaded before them aborts the process (ORACLE.md).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

import numpy as np

from tests.services import missing_service


def import_tensorflow() -> ModuleType:
    """``tensorflow.compat.v1``, or skip (fail under ``CI``) when TensorFlow is not importable."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import torch  # noqa: F401  (load order, see module docstring)

    try:
        import triton._C.libtriton  # noqa: F401
    except ImportError:
        pass
    try:
        import tensorflow as tf
    except ImportError as e:
        missing_service(
            f"TensorFlow is not importable ({e}); install the convert extra: "
            "pip install -e '.[convert]'"
        )
    return tf.compat.v1


def build_matting_graph(
    path: Path,
    *,
    seed: int = 0,
    width: int = 8,
    input_dtype: str = "float32",
    unknown_rank: bool = False,
) -> Path:
    """Write a frozen graph with the real graph's interface to ``path`` (a ``tf_graph.pb``).

    Args:
        path: file to write.
        seed: weights seed; weights are drawn so that the alpha spans (0, 1) without saturating.
        width: channels of the hidden convolutions.
        input_dtype: dtype of the ``input_image`` placeholder (the pipeline feeds float64, which a
            TF session casts to the placeholder's dtype).
        unknown_rank: declare the placeholder without any shape (rank unknown), not ``(?, ?, 3)``.

    Returns:
        ``path``.
    """
    tf = import_tensorflow()
    rng = np.random.default_rng(seed)

    def weight(*shape: int) -> np.ndarray:
        fan_in = int(np.prod(shape[:-1]))
        return (rng.standard_normal(shape) * (1.5 / np.sqrt(fan_in))).astype(np.float32)

    g = tf.Graph()
    with g.as_default():
        shape = None if unknown_rank else [None, None, 3]
        image = tf.placeholder(getattr(tf, input_dtype), shape=shape, name="input_image")
        x = tf.cast(image, tf.float32)
        x = tf.expand_dims(x, 0) / 255.0 - 0.5  # (1, H, W, 3)
        bias = rng.uniform(-0.1, 0.1, width).astype(np.float32)
        c1 = tf.nn.relu(tf.nn.conv2d(x, weight(3, 3, 3, width), [1, 1, 1, 1], "SAME") + bias)
        p = tf.nn.avg_pool2d(c1, 2, 2, "SAME")  # odd sizes: ceil(H/2)
        c2 = tf.nn.relu(tf.nn.conv2d(p, weight(3, 3, width, width), [1, 1, 1, 1], "SAME"))
        up = tf.image.resize_bilinear(c2, tf.shape(c1)[1:3], half_pixel_centers=True)
        cat = tf.concat([c1, up], axis=-1)
        logit = tf.nn.conv2d(cat, 4 * weight(1, 1, 2 * width, 1), [1, 1, 1, 1], "SAME")
        alpha = tf.sigmoid(logit)[0] * 255.0  # (H, W, 1)
        rgba = tf.concat([tf.cast(image, tf.float32), alpha], axis=-1)
        tf.cast(
            rgba, tf.uint8, name="output_png"
        )  # float -> uint8 truncates, as the real graph does
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(g.as_graph_def().SerializeToString())
    return path


def run_tf_graph(graph_file: Path, image: np.ndarray) -> np.ndarray:
    """Run a frozen matting graph the way ModelScope's pipeline does.

    Args:
        graph_file: a ``tf_graph.pb``.
        image: (H, W, 3) uint8 RGB.

    Returns:
        (H, W, 4) uint8 RGBA, the graph's ``output_png:0`` (before the pipeline's RGBA→BGRA flip).
    """
    tf = import_tensorflow()
    gd = tf.GraphDef()
    gd.ParseFromString(Path(graph_file).read_bytes())
    g = tf.Graph()
    with g.as_default():
        tf.import_graph_def(gd, name="")
    with tf.Session(graph=g) as sess:
        return sess.run("output_png:0", feed_dict={"input_image:0": image.astype(float)})


def smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A deterministic (H, W, 3) uint8 RGB test image: smooth gradients, a disc and some noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    yy /= max(height - 1, 1)
    xx /= max(width - 1, 1)
    disc = ((yy - 0.5) ** 2 + (xx - 0.45) ** 2 < 0.09).astype(np.float32)
    img = np.stack([200 * xx + 40 * disc, 180 * yy, 120 + 100 * disc], axis=-1)
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)
