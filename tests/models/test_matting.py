"""Matting without TensorFlow: transforms, compositing, the ONNX runtime on the demo graph, errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.models.tf_graphs import smooth_image
from vbatch import models
from vbatch.models.matting import (
    ModelDirError,
    alpha_of,
    composite,
    cutout,
    load_transforms,
    parse_color,
)
from vbatch.models.matting.modeldir import demo_alpha, write_random_model_dir
from vbatch.models.matting.transforms import MattingTransforms, fit_long_side


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory):
    return write_random_model_dir(tmp_path_factory.mktemp("matting_demo"))


def test_import_does_not_pull_tensorflow_or_onnx() -> None:
    code = (
        "import sys; from vbatch import models; models.load_transforms('matting', '.');"
        "import vbatch.models.matting.model, vbatch.models.matting.transforms;"
        "import vbatch.models.matting.convert, vbatch.models.matting.modeldir;"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tf2onnx', 'onnx', 'keras')];"
        "assert not bad, bad"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=Path(models.__file__).parent.parent
    )


def test_fit_long_side() -> None:
    assert fit_long_side(1500, 1000, 2000) == (1500, 1000)
    assert fit_long_side(2000, 2000, 2000) == (2000, 2000)
    assert fit_long_side(4000, 3001, 2000) == (2000, 1500)
    assert fit_long_side(3001, 4000, 2000) == (1500, 2000)
    assert fit_long_side(10000, 3, 2000) == (2000, 1)


def test_preprocess_downscales_only_above_max_side() -> None:
    t = MattingTransforms(max_side=64)
    small = smooth_image(64, 40)
    assert t.preprocess(small) is small
    big = smooth_image(130, 97)
    out = t.preprocess(big)
    assert out.shape == (64, 48, 3) and out.dtype == np.uint8
    # area downscale of a smooth image stays close to the block means
    assert abs(float(out.mean()) - float(big.mean())) < 2.0
    with pytest.raises(ValueError, match="uint8"):
        t.preprocess(big.astype(np.float32))


def test_postprocess_resizes_alpha_and_keeps_original_pixels() -> None:
    t = MattingTransforms(max_side=64)
    image = smooth_image(130, 97)
    small = t.preprocess(image)
    alpha = np.tile(np.linspace(0, 255, small.shape[1]).astype(np.uint8), (small.shape[0], 1))
    out = t.postprocess(cutout(small, alpha), image.shape[:2], image=image)
    assert out.shape == (130, 97, 4)
    assert np.array_equal(out[..., :3], image)
    # a horizontal ramp resized back is still a ramp spanning the range
    assert out[0, 0, 3] < 5 and out[0, -1, 3] > 250
    assert np.all(np.diff(out[65, :, 3].astype(int)) >= 0)
    # same size: exactly the graph's output
    rgba = cutout(image, np.full(image.shape[:2], 7, np.uint8))
    assert t.postprocess(rgba, image.shape[:2]) is rgba
    # without the original, the graph's RGB is upscaled
    up = t.postprocess(cutout(small, alpha), image.shape[:2])
    assert up.shape == (130, 97, 4) and np.abs(up[..., :3].astype(int) - image).mean() < 10


def test_alpha_cutout_composite() -> None:
    image = smooth_image(20, 30)
    alpha = np.zeros((20, 30), np.uint8)
    alpha[:, 10:20] = 255
    alpha[:, 20:] = 128
    rgba = cutout(image, alpha)
    assert rgba.shape == (20, 30, 4) and np.array_equal(alpha_of(rgba), alpha)
    out = composite(rgba, "#00ff00")
    assert np.array_equal(out[:, :10], np.broadcast_to([0, 255, 0], (20, 10, 3)))
    assert np.array_equal(out[:, 10:20], image[:, 10:20])
    expected = np.rint(128 / 255 * image[:, 20:] + (127 / 255) * np.array([0, 255, 0]))
    assert np.array_equal(out[:, 20:], expected.astype(np.uint8))
    # background image of another size is resized; same result as with a plain colour image
    bg = np.full((5, 7, 3), (10, 20, 30), np.uint8)
    assert np.array_equal(composite(rgba, bg), composite(rgba, (10, 20, 30)))
    assert np.array_equal(parse_color("1,2,3"), [1, 2, 3]) and np.array_equal(
        parse_color("0A0B0C"), [10, 11, 12]
    )
    with pytest.raises(ValueError):
        parse_color("#12345")
    with pytest.raises(ValueError):
        composite(image, (0, 0, 0))


def test_demo_model_predicts_its_formula(demo_dir) -> None:
    model = models.load_model("matting", demo_dir, device="cpu", threads=1)
    assert model.name == "matting" and model.device.type == "cpu" and len(model.model_version) == 12
    images = [smooth_image(97, 131, seed=1), smooth_image(64, 64, seed=2), smooth_image(1, 1)]
    outs = model.predict(images)
    for image, out in zip(images, outs, strict=True):
        assert out.shape == (*image.shape[:2], 4) and out.dtype == np.uint8
        assert np.array_equal(out[..., :3], image)
        ref = demo_alpha(image)
        assert np.abs(out[..., 3].astype(np.float32) - np.floor(ref)).max() <= 1
    # a plausible matte: the disc differs from the mean colour, the backdrop does not
    assert outs[0][..., 3].max() > 200 and outs[0][..., 3].min() < 100


def test_demo_model_above_max_side(demo_dir) -> None:
    model = models.load_model("matting", demo_dir, device="cpu", threads=1, max_side=80)
    image = smooth_image(201, 150, seed=3)
    (out,) = model.predict([image])
    assert out.shape == (201, 150, 4)
    assert np.array_equal(out[..., :3], image)
    small = load_transforms(demo_dir, max_side=80).preprocess(image)
    assert small.shape == (80, 60, 3)
    (graph_out,) = model.forward([small])
    expected = cv2.resize(graph_out[..., 3], (150, 201), interpolation=cv2.INTER_LINEAR)
    assert np.array_equal(out[..., 3], expected)


def test_registry_transforms_default_max_side(demo_dir) -> None:
    t = models.load_transforms("matting", demo_dir)
    assert isinstance(t, MattingTransforms) and t.max_side == 2000


def test_graph_only_dir_names_the_convert_command(tmp_path) -> None:
    (tmp_path / "tf_graph.pb").write_bytes(b"\x00")
    with pytest.raises(ModelDirError, match=r"vbatch matting convert --model-dir .*"):
        models.load_model("matting", tmp_path, device="cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelDirError, match=r"neither model.onnx nor tf_graph.pb"):
        models.load_model("matting", empty, device="cpu")


def test_corrupt_or_stale_onnx(tmp_path, demo_dir) -> None:
    (tmp_path / "model.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(ModelDirError, match=r"cannot load .*model.onnx with ONNX Runtime"):
        models.load_model("matting", tmp_path, device="cpu")
    # model.onnx next to a graph it was not converted from
    stale = tmp_path / "stale"
    write_random_model_dir(stale)
    (stale / "tf_graph.pb").write_bytes(b"some other graph")
    with pytest.raises(ModelDirError, match=r"no onnx_meta.json|converted from another"):
        models.load_model("matting", stale, device="cpu")
    (stale / "onnx_meta.json").write_text('{"source_sha256": "0123456789abcdef"}')
    with pytest.raises(ModelDirError, match=r"converted from another tf_graph.pb.*--force"):
        models.load_model("matting", stale, device="cpu")


def test_forward_rejects_non_rgb(demo_dir) -> None:
    model = models.load_model("matting", demo_dir, device="cpu", threads=1)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        model.forward([np.zeros((8, 8), np.uint8)])
    assert model.predict([]) == []
