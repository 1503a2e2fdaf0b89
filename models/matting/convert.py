"""Convert ModelScope's matting graph ``tf_graph.pb`` (TensorFlow 1 frozen graph) to ONNX, once.

Reference: ``modelscope/pipelines/cv/image_matting_pipeline.py`` — the pipeline imports the frozen
graph into a TF1 session, feeds ``input_image:0`` with the RGB image as float64 (H, W, 3) in 0..255
(the session casts it to the placeholder's dtype) and fetches ``output_png:0``, (H, W, 4) uint8
RGBA. No PyTorch source of the network exists; tf2onnx (https://github.com/onnx/tensorflow-onnx)
translates the graph op by op, and this module proves the translation on sample images against
TensorFlow itself before writing anything.

TensorFlow and tf2onnx are imported only inside :func:`convert_graph` (the ``convert`` extra):
importing :mod:`vbatch.models.matting` never needs them, and workers do not have them. torch (and triton's
native library) are imported first, because TensorFlow's LLVM loaded before them aborts the
process (ORACLE.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import cv2
import numpy as np

from vbatch.models.fileio import atomic_write_bytes
from vbatch.models.matting.config import MATTING
from vbatch.models.matting.model import ORT_DTYPES, read_meta, session_options

logger = logging.getLogger(__name__)

#: ONNX opset of the converted graph: supported by tf2onnx ≥ 1.14 and every onnxruntime ≥ 1.14.
DEFAULT_OPSET = 17
#: sample sizes (H, W) checked against TensorFlow when no images are given: odd sizes included,
#: since a U-Net's down/up-sampling is where a translation goes wrong at odd sizes.
DEFAULT_CHECK_SIZES: tuple[tuple[int, int], ...] = ((512, 512), (357, 480), (753, 1001))
#: largest alpha difference (grey levels) accepted between TensorFlow and ONNX Runtime. Float
#: rounding moves a truncating float→uint8 cast by one level now and then; more is a real mismatch.
DEFAULT_TOLERANCE = 2

_IN, _OUT = MATTING.input_tensor, MATTING.output_tensor
_RENAME = {_IN: _IN.split(":")[0], _OUT: _OUT.split(":")[0]}


class ConversionError(RuntimeError):
    """The graph cannot be read, converted, or its ONNX translation disagrees with TensorFlow."""


@dataclass
class ConversionReport:
    """What :func:`convert_graph` did and how close ONNX Runtime is to TensorFlow."""

    onnx_path: Path
    meta_path: Path
    source_sha256: str
    opset: int
    #: (H, W) of the images checked against TensorFlow
    checked_sizes: list[tuple[int, int]] = field(default_factory=list)
    #: largest |TF − ONNX| over the checked images, in grey levels, alpha channel / RGB channels
    max_abs_diff_alpha: int = 0
    max_abs_diff_rgb: int = 0
    #: share of alpha pixels that differ at all
    frac_alpha_differing: float = 0.0
    tf_version: str = ""
    tf2onnx_version: str = ""
    onnxruntime_version: str = ""
    seconds: float = 0.0
    #: True when ``model.onnx`` was already converted from this very graph (nothing done)
    skipped: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["onnx_path"], d["meta_path"] = str(self.onnx_path), str(self.meta_path)
        d["checked_sizes"] = [list(s) for s in self.checked_sizes]
        return d

    def summary(self) -> str:
        if self.skipped:
            return f"{self.onnx_path} is up to date with its graph ({self.source_sha256[:12]}); nothing done"
        return (
            f"wrote {self.onnx_path} (opset {self.opset}, graph {self.source_sha256[:12]}) in "
            f"{self.seconds:.1f} s; checked against TensorFlow {self.tf_version} on sizes "
            f"{self.checked_sizes}: max |diff| alpha {self.max_abs_diff_alpha}, rgb "
            f"{self.max_abs_diff_rgb} grey levels ({100 * self.frac_alpha_differing:.3f}% of alpha "
            f"pixels differ)"
        )


def sample_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A deterministic (H, W, 3) uint8 RGB check image: gradients, an ellipse "subject", noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    yy /= max(height - 1, 1)
    xx /= max(width - 1, 1)
    subject = (((yy - 0.55) / 0.4) ** 2 + ((xx - 0.5) / 0.25) ** 2 < 1).astype(np.float32)
    img = np.stack([90 + 120 * xx, 140 + 80 * yy, 200 - 60 * xx], axis=-1)
    img = img * (1 - subject[..., None]) + np.array([190, 140, 110]) * subject[..., None]
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _read_image(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ConversionError(f"cannot read check image {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _import_tensorflow() -> tuple[ModuleType, ModuleType]:
    """``(tf.compat.v1, tf2onnx)``, after torch and triton (see the module docstring)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import torch  # noqa: F401  (load order: torch's LLVM before TensorFlow's)

    try:
        import triton._C.libtriton  # noqa: F401
    except ImportError:
        pass
    try:
        import tensorflow as tf
        import tf2onnx
    except ImportError as e:
        raise ConversionError(
            f"converting the matting graph needs TensorFlow and tf2onnx ({e}); install the convert "
            "extra on the machine that converts: pip install -e '.[convert]'"
        ) from e
    return tf.compat.v1, tf2onnx


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _report_from_meta(meta: dict, onnx_path: Path, meta_path: Path) -> ConversionReport:
    return ConversionReport(
        onnx_path=onnx_path,
        meta_path=meta_path,
        source_sha256=meta["source_sha256"],
        opset=int(meta.get("opset", 0)),
        checked_sizes=[tuple(s) for s in meta.get("checked_sizes", [])],
        max_abs_diff_alpha=int(meta.get("max_abs_diff_alpha", 0)),
        max_abs_diff_rgb=int(meta.get("max_abs_diff_rgb", 0)),
        frac_alpha_differing=float(meta.get("frac_alpha_differing", 0.0)),
        tf_version=meta.get("tf_version", ""),
        tf2onnx_version=meta.get("tf2onnx_version", ""),
        onnxruntime_version=meta.get("onnxruntime_version", ""),
        skipped=True,
    )


def convert_graph(
    model_dir: Path,
    out: Path | None = None,
    check_images: Sequence[np.ndarray | str | Path] | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    tolerance: int = DEFAULT_TOLERANCE,
    force: bool = False,
) -> ConversionReport:
    """Convert ``model_dir/tf_graph.pb`` to ONNX, check it against TensorFlow, write it.

    Args:
        model_dir: ModelScope's ``cv_unet_image-matting`` directory (holds ``tf_graph.pb``).
        out: the ONNX file to write; default ``model_dir/model.onnx`` (where :func:`load` looks).
            ``onnx_meta.json`` is written next to it.
        check_images: (H, W, 3) uint8 RGB images (or paths to image files) run through both
            TensorFlow and ONNX Runtime; default: synthetic images of :data:`DEFAULT_CHECK_SIZES`.
            Real photos make a stronger check of the alpha; pass some when you have them.
        opset: ONNX opset.
        tolerance: largest accepted alpha difference in grey levels; above it nothing is written.
        force: convert even when ``out`` was already converted from this graph.

    Returns:
        A :class:`ConversionReport` (largest differences, versions, sizes checked).

    Raises:
        ConversionError: no/corrupt graph, not the matting graph's interface, tf2onnx failure,
            static input shape, or a difference above ``tolerance``.
    """
    started = time.perf_counter()
    model_dir = Path(model_dir)
    graph_path = model_dir / MATTING.graph_file
    onnx_path = Path(out) if out is not None else model_dir / MATTING.onnx_file
    meta_path = onnx_path.with_name(MATTING.meta_file)
    if not graph_path.is_file():
        raise ConversionError(
            f"{model_dir}: no {MATTING.graph_file} (ModelScope's TensorFlow graph) to convert"
        )
    sha = _sha256(graph_path)
    if not force and onnx_path.is_file():
        try:
            meta = read_meta(meta_path.parent)
        except Exception:
            meta = {}
        if meta.get("source_sha256") == sha and meta.get("opset") == opset:
            logger.info(
                "%s already converted from %s; use force=True to redo", onnx_path, graph_path
            )
            return _report_from_meta(meta, onnx_path, meta_path)

    tf, tf2onnx = _import_tensorflow()
    import onnxruntime as ort

    graph_def, graph = _import_graph(tf, graph_path)
    data = _to_onnx(tf2onnx, graph_def, graph, graph_path, opset)
    session, feed_dtype = _onnx_session(data)
    report = ConversionReport(
        onnx_path=onnx_path,
        meta_path=meta_path,
        source_sha256=sha,
        opset=opset,
        tf_version=tf.VERSION if hasattr(tf, "VERSION") else "",
        tf2onnx_version=tf2onnx.__version__,
        onnxruntime_version=ort.__version__,
    )
    images = (
        check_images
        if check_images is not None
        else [sample_image(h, w, seed=i) for i, (h, w) in enumerate(DEFAULT_CHECK_SIZES)]
    )
    _compare(tf, graph, session, feed_dtype, images, report)
    if report.max_abs_diff_alpha > tolerance or report.max_abs_diff_rgb > tolerance:
        raise ConversionError(
            f"ONNX translation of {graph_path} disagrees with TensorFlow: max |diff| alpha "
            f"{report.max_abs_diff_alpha}, rgb {report.max_abs_diff_rgb} grey levels (tolerance "
            f"{tolerance}); nothing written"
        )

    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(onnx_path, data)
    report.seconds = time.perf_counter() - started
    meta = {
        "source": MATTING.graph_file,
        "modelscope_id": MATTING.modelscope_id,
        **{
            k: v
            for k, v in report.to_dict().items()
            if k not in ("onnx_path", "meta_path", "skipped")
        },
        "input": session.get_inputs()[0].name,
        "output": session.get_outputs()[0].name,
    }
    atomic_write_bytes(meta_path, (json.dumps(meta, indent=2) + "\n").encode())
    logger.info("%s", report.summary())
    return report


def _import_graph(tf: ModuleType, graph_path: Path) -> tuple[Any, Any]:
    """(the GraphDef, the imported graph) of ModelScope's matting graph; refuses another graph."""
    graph_def = _parse_graph(tf, graph_path)
    graph = tf.Graph()
    try:
        with graph.as_default():
            tf.import_graph_def(graph_def, name="")
    except Exception as e:
        raise ConversionError(f"{graph_path}: TensorFlow cannot import the graph ({e})") from e
    names = {op.name for op in graph.get_operations()}
    missing = [t for t in (_IN, _OUT) if t.split(":")[0] not in names]
    if missing:
        raise ConversionError(
            f"{graph_path} is not ModelScope's matting graph: no tensor {', '.join(missing)} "
            f"(the pipeline feeds {_IN} and fetches {_OUT})"
        )
    return graph_def, graph


def _to_onnx(
    tf2onnx: ModuleType, graph_def: Any, graph: Any, graph_path: Path, opset: int
) -> bytes:
    """The serialised ONNX model tf2onnx makes of the graph, with dynamic H and W."""
    placeholder = graph.get_tensor_by_name(_IN)
    # The pipeline always feeds (H, W, 3); a placeholder frozen without a shape gets that one so
    # that tf2onnx can infer every shape downstream while H and W stay dynamic.
    shape_override = {_IN: [None, None, 3]} if placeholder.shape.rank is None else None
    logger.info("converting %s with tf2onnx %s (opset %d)", graph_path, tf2onnx.__version__, opset)
    try:
        model_proto, _ = tf2onnx.convert.from_graph_def(
            graph_def,
            name="matting",
            input_names=[_IN],
            output_names=[_OUT],
            opset=opset,
            shape_override=shape_override,
            tensors_to_rename=_RENAME,
        )
    except Exception as e:
        raise ConversionError(f"tf2onnx cannot convert {graph_path}: {e}") from e
    return bytes(model_proto.SerializeToString())


def _onnx_session(data: bytes) -> tuple[Any, Any]:
    """(an ONNX Runtime CPU session of ``data``, the dtype its input is fed as); refuses a static
    input shape or a non-float input."""
    import onnxruntime as ort

    session = ort.InferenceSession(
        data, sess_options=session_options(None), providers=["CPUExecutionProvider"]
    )
    (inp,) = session.get_inputs()
    if any(isinstance(d, int) for d in inp.shape[:2]):
        raise ConversionError(
            f"converted input {inp.name} has a static shape {inp.shape}; H and W must stay dynamic"
        )
    feed_dtype = ORT_DTYPES.get(inp.type)
    if feed_dtype is None:
        raise ConversionError(
            f"converted input {inp.name} has type {inp.type}, expected a float image"
        )
    return session, feed_dtype


def _compare(
    tf: ModuleType,
    graph: Any,
    session: Any,
    feed_dtype: Any,
    images: Sequence[np.ndarray | str | Path],
    report: ConversionReport,
) -> None:
    """Run TensorFlow and ONNX Runtime on ``images``; the largest differences into ``report``."""
    placeholder = graph.get_tensor_by_name(_IN)
    name = session.get_inputs()[0].name
    differing = total = 0
    with tf.Session(graph=graph) as tf_session:
        fetch = graph.get_tensor_by_name(_OUT)
        for image in images:
            image = _read_image(Path(image)) if isinstance(image, (str, Path)) else image
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ConversionError(
                    f"check images must be (H, W, 3) uint8 RGB, got {image.dtype} {image.shape}"
                )
            # exactly the pipeline's feed: float64, which the session casts to the placeholder's dtype
            expected = tf_session.run(fetch, feed_dict={placeholder: image.astype(float)})
            (got,) = session.run(None, {name: image.astype(feed_dtype)})
            if got.shape != expected.shape or got.dtype != expected.dtype:
                raise ConversionError(
                    f"ONNX output {got.dtype} {got.shape} differs from TensorFlow's "
                    f"{expected.dtype} {expected.shape} for an image of shape {image.shape}"
                )
            diff = np.abs(got.astype(np.int16) - expected.astype(np.int16))
            report.checked_sizes.append(tuple(image.shape[:2]))
            report.max_abs_diff_alpha = max(report.max_abs_diff_alpha, int(diff[..., 3].max()))
            report.max_abs_diff_rgb = max(report.max_abs_diff_rgb, int(diff[..., :3].max()))
            differing += int(np.count_nonzero(diff[..., 3]))
            total += diff[..., 3].size
    report.frac_alpha_differing = differing / max(total, 1)


def _parse_graph(tf: ModuleType, graph_path: Path) -> Any:
    graph_def = tf.GraphDef()
    try:
        graph_def.ParseFromString(graph_path.read_bytes())
    except Exception as e:  # google.protobuf.message.DecodeError, truncated files
        raise ConversionError(
            f"cannot parse {graph_path} as a TensorFlow GraphDef (corrupt or not a frozen graph): {e}"
        ) from e
    if not graph_def.node:
        raise ConversionError(f"{graph_path} holds an empty TensorFlow graph")
    return graph_def
