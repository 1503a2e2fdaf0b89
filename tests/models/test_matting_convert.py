"""Matting conversion TensorFlow → ONNX on real (small) frozen graphs with the real interface.

Needs TensorFlow and tf2onnx (the ``convert`` extra): skipped when TensorFlow is not importable,
failed instead under ``CI`` (see :func:`tests.models.tf_graphs.import_tensorflow`).
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from tests.models.tf_graphs import (
    build_matting_graph,
    import_tensorflow,
    run_tf_graph,
    smooth_image,
)
from vbatch import models
from vbatch.models.checkpoint import file_version
from vbatch.models.matting.convert import ConversionError, convert_graph

SIZES = [(64, 64), (97, 131), (131, 97), (1, 1), (300, 211)]


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory):
    import_tensorflow()
    model_dir = tmp_path_factory.mktemp("matting")
    build_matting_graph(model_dir / "tf_graph.pb", seed=0)
    report = convert_graph(model_dir)  # default check images: 512², 357×480, 753×1001
    return model_dir, report


def test_convert_report_and_meta(converted) -> None:
    model_dir, report = converted
    assert not report.skipped
    assert report.onnx_path == model_dir / "model.onnx" and report.onnx_path.is_file()
    assert report.checked_sizes == [(512, 512), (357, 480), (753, 1001)]
    assert report.max_abs_diff_alpha <= 1 and report.max_abs_diff_rgb == 0
    meta = json.loads((model_dir / "onnx_meta.json").read_text())
    assert meta["source_sha256"].startswith(file_version(model_dir / "tf_graph.pb"))
    assert meta["opset"] == report.opset == 17
    assert meta["max_abs_diff_alpha"] == report.max_abs_diff_alpha
    assert meta["tf_version"] and meta["tf2onnx_version"]
    # H and W stay dynamic in the ONNX input
    (inp,) = ort.InferenceSession(
        str(report.onnx_path), providers=["CPUExecutionProvider"]
    ).get_inputs()
    assert inp.name == "input_image" and inp.shape[2] == 3
    assert not any(isinstance(d, int) for d in inp.shape[:2])


def test_predictions_equal_tensorflow(converted) -> None:
    model_dir, _ = converted
    model = models.load_model("matting", model_dir, device="cpu", threads=1)
    assert model.model_version == file_version(model_dir / "tf_graph.pb")
    images = [smooth_image(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
    outs = model.predict(images)
    for image, out in zip(images, outs, strict=True):
        expected = run_tf_graph(model_dir / "tf_graph.pb", image)
        assert out.shape == expected.shape == (*image.shape[:2], 4) and out.dtype == np.uint8
        assert np.array_equal(out[..., :3], expected[..., :3])
        assert np.abs(out[..., 3].astype(int) - expected[..., 3]).max() <= 1, image.shape
    # the alpha is not trivial: it varies across the image
    assert np.ptp(outs[4][..., 3]) > 50


def test_above_max_side_matches_tensorflow_on_the_downscaled_image(converted) -> None:
    model_dir, _ = converted
    model = models.load_model("matting", model_dir, device="cpu", threads=1, max_side=128)
    image = smooth_image(301, 207, seed=7)  # odd size; long side 301 > 128
    (out,) = model.predict([image])
    small = cv2.resize(image, (88, 128), interpolation=cv2.INTER_AREA)
    tf_small = run_tf_graph(model_dir / "tf_graph.pb", small)
    expected_alpha = cv2.resize(tf_small[..., 3], (207, 301), interpolation=cv2.INTER_LINEAR)
    assert out.shape == (301, 207, 4)
    assert np.array_equal(out[..., :3], image)  # full-resolution pixels, not the downscaled ones
    assert np.abs(out[..., 3].astype(int) - expected_alpha).max() <= 1


@pytest.mark.parametrize(
    "options",
    [{"input_dtype": "float64"}, {"unknown_rank": True}],
    ids=["float64-input", "unknown-rank"],
)
def test_other_placeholder_declarations(tmp_path, options) -> None:
    import_tensorflow()
    build_matting_graph(tmp_path / "tf_graph.pb", seed=1, width=4, **options)
    checks = [smooth_image(33, 47), smooth_image(40, 40)]
    report = convert_graph(tmp_path, check_images=checks)
    assert report.max_abs_diff_alpha <= 1 and report.checked_sizes == [(33, 47), (40, 40)]
    model = models.load_model("matting", tmp_path, device="cpu", threads=1)
    image = smooth_image(51, 29, seed=5)
    expected = run_tf_graph(tmp_path / "tf_graph.pb", image)
    assert np.abs(model.predict([image])[0].astype(int) - expected).max() <= 1


def test_convert_once_then_force(converted, tmp_path) -> None:
    model_dir, report = converted
    mtime = report.onnx_path.stat().st_mtime_ns
    again = convert_graph(model_dir)
    assert again.skipped and again.source_sha256 == report.source_sha256
    assert again.max_abs_diff_alpha == report.max_abs_diff_alpha
    assert report.onnx_path.stat().st_mtime_ns == mtime
    # elsewhere, with force, and a failing tolerance: nothing is written
    out = tmp_path / "sub" / "model.onnx"
    with pytest.raises(ConversionError, match=r"disagrees with TensorFlow.*nothing written"):
        convert_graph(model_dir, out=out, check_images=[smooth_image(16, 16)], tolerance=-1)
    assert not out.exists() and not (tmp_path / "sub" / "onnx_meta.json").exists()
    forced = convert_graph(model_dir, out=out, check_images=[smooth_image(16, 16)], force=True)
    assert not forced.skipped and out.is_file() and (out.parent / "onnx_meta.json").is_file()


def test_corrupt_and_foreign_graphs(tmp_path, converted) -> None:
    model_dir, _ = converted
    tf = import_tensorflow()
    with pytest.raises(ConversionError, match=r"no tf_graph.pb"):
        convert_graph(tmp_path)
    good = (model_dir / "tf_graph.pb").read_bytes()
    for i, data in enumerate([good[: len(good) // 2], b"\xff" * 100, b""]):
        d = tmp_path / f"bad{i}"
        d.mkdir()
        (d / "tf_graph.pb").write_bytes(data)
        with pytest.raises(ConversionError, match=r"tf_graph.pb"):
            convert_graph(d)
        assert not (d / "model.onnx").exists()
    # a valid graph without the pipeline's tensors
    g = tf.Graph()
    with g.as_default():
        x = tf.placeholder(tf.float32, [None, None, 3], name="image")
        tf.identity(x, name="out")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "tf_graph.pb").write_bytes(g.as_graph_def().SerializeToString())
    with pytest.raises(
        ConversionError,
        match="not ModelScope's matting graph: no tensor input_image:0, output_png:0",
    ):
        convert_graph(foreign)
