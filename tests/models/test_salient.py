"""Fast tests of the salient models: shapes, config.py as data, converter, transforms, predictor."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as tvt

from vbatch.models.checkpoint import CheckpointError, file_version, load_checkpoint, read_state_dict
from vbatch.models.registry import load_model, load_transforms
from vbatch.models.salient import (
    SalientPredictor,
    SalientTransforms,
    SalientWeights,
)
from vbatch.models.salient.config import (
    DEFAULT_MEAN,
    DEFAULT_STD,
    SENET_TINY,
    U2NET,
    U2NET_TINY,
    SalientConfigError,
    parse_config_py,
    read_model_dir,
)
from vbatch.models.salient.convert import (
    convert_senet,
    convert_u2net,
    senet_to_modelscope,
    senet_unused_keys,
)
from vbatch.models.salient.model import SENet
from vbatch.models.salient.modeldir import randomize_, write_random_model_dir
from vbatch.models.salient.u2net import U2Net


def _images(rng: np.random.Generator, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
    """Photo-like RGB images: a colour gradient with a filled rectangle and mild noise."""
    out = []
    for h, w in sizes:
        t = np.linspace(0, 1, w, dtype=np.float32)[None, :, None]
        img = rng.uniform(0, 255, 3) * (1 - t) + rng.uniform(0, 255, 3) * t
        img = np.repeat(img, h, axis=0)
        img[h // 4 : h // 2, w // 3 : 2 * w // 3] = rng.uniform(0, 255, 3)
        img += rng.normal(0, 5, img.shape)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


# ---------------------------------------------------------------- networks (TINY presets)


@pytest.fixture(scope="module")
def tiny_senet() -> SENet:
    return randomize_(SENet(SENET_TINY), seed=0, calib_size=(64, 64))


@pytest.fixture(scope="module")
def tiny_u2net() -> U2Net:
    return randomize_(U2Net(U2NET_TINY), seed=0, calib_size=(64, 64))


def test_senet_tiny_forward_shape(tiny_senet: SENet) -> None:
    with torch.inference_mode():
        y = tiny_senet(torch.randn(2, 3, 64, 96))
    assert y.shape == (2, 1, 64, 96)
    assert torch.isfinite(y).all() and (y > 0).all() and (y < 1).all()
    assert y[0].std() > 1e-3  # not a constant map


def test_u2net_tiny_forward_any_size(tiny_u2net: U2Net) -> None:
    with torch.inference_mode():
        y = tiny_u2net(torch.randn(1, 3, 50, 70))  # not a multiple of 32: ceil-mode pooling path
    assert y.shape == (1, 1, 50, 70)
    assert torch.isfinite(y).all() and (y > 0).all() and (y < 1).all()


def test_real_presets_have_modelscope_parameter_counts() -> None:
    # published SENet: 976 checkpoint entries, of which 72 belong to the never-called ABlock branches
    senet = SENet()
    assert len(senet.state_dict()) + len(senet_unused_keys(senet)) == 976
    assert len(senet_unused_keys(senet)) == 72
    assert len(U2Net().state_dict()) == 798


# ---------------------------------------------------------------- config.py, read as data


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "config.py"
    p.write_text(text)
    return p


def test_config_py_lists_and_tuples(tmp_path: Path) -> None:
    p = _write(
        tmp_path,
        '"""SENet config."""\n'
        "norm_mean = [0.5, 0.4, 0.3]\n"
        "norm_std = (0.2, 0.25, 0.3)\n"
        "norm_size = (288, 352)\n"
        "other: dict = {'a': [1, 2]}\n",
    )
    w = parse_config_py(p)
    assert w.variant == "senet"
    assert w.norm_mean == (0.5, 0.4, 0.3)
    assert w.norm_std == (0.2, 0.25, 0.3)
    assert w.norm_size == (288, 352)
    assert read_model_dir(tmp_path) == w


def test_no_config_py_means_u2net_defaults(tmp_path: Path) -> None:
    w = read_model_dir(tmp_path)
    assert (w.variant, w.norm_mean, w.norm_std, w.norm_size) == (
        "u2net",
        DEFAULT_MEAN,
        DEFAULT_STD,
        (320, 320),
    )


def test_config_py_syntax_error_names_the_file(tmp_path: Path) -> None:
    p = _write(tmp_path, "norm_mean = [0.5, 0.4\n")
    with pytest.raises(SalientConfigError, match=r"config\.py.*syntax"):
        parse_config_py(p)


@pytest.mark.parametrize(
    "template",
    [
        "norm_mean = __import__('os').system('touch {marker}')\nnorm_std = [1, 1, 1]\nnorm_size = [32, 32]\n",
        "import os\nos.system('touch {marker}')\nnorm_mean = [0, 0, 0]\nnorm_std = [1, 1, 1]\nnorm_size = [32, 32]\n",
        "norm_mean = [0, 0, 0]\nnorm_std = [1, 1, 1]\nnorm_size = [32, 32]\n__import__('os').system('touch {marker}')\n",
    ],
)
def test_config_py_is_never_executed(tmp_path: Path, template: str) -> None:
    marker = tmp_path / "executed"
    p = _write(tmp_path, template.format(marker=marker))
    with pytest.raises(SalientConfigError, match=r"config\.py.*never executed"):
        parse_config_py(p)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("norm_mean = [0, 0, 0]\nnorm_std = [1, 1, 1]\nnorm_size = 320\n", "norm_size"),
        ("norm_mean = [0, 0, 0]\nnorm_std = [1, 1, 1]\nnorm_size = [320]\n", "norm_size"),
        ("norm_mean = [0, 0, 0]\nnorm_std = [1, 1, 1]\nnorm_size = [320, 0]\n", "norm_size"),
        ("norm_mean = [0, 0, 0]\nnorm_std = [1, 1, 1]\nnorm_size = [320.0, 320]\n", "norm_size"),
        ("norm_mean = [0, 0]\nnorm_std = [1, 1, 1]\nnorm_size = [320, 320]\n", "norm_mean"),
        ("norm_mean = 'abc'\nnorm_std = [1, 1, 1]\nnorm_size = [320, 320]\n", "norm_mean"),
        ("norm_mean = [0, 0, 0]\nnorm_std = [1, 0, 1]\nnorm_size = [320, 320]\n", "norm_std"),
        ("norm_mean = [0, 0, 0]\nnorm_size = [320, 320]\n", "missing norm_std"),
    ],
)
def test_config_py_wrong_values(tmp_path: Path, body: str, match: str) -> None:
    p = _write(tmp_path, body)
    with pytest.raises(SalientConfigError, match=match) as err:
        parse_config_py(p)
    assert str(p) in str(err.value)


# ---------------------------------------------------------------- converter / strict loading


def _modelscope_senet_sd(net: SENet) -> dict[str, torch.Tensor]:
    unused = {k: torch.full(s, 0.5) for k, s in senet_unused_keys(net).items()}
    return senet_to_modelscope(net.state_dict(), net, unused)


def test_senet_converter_consumes_every_key(tiny_senet: SENet) -> None:
    ms = _modelscope_senet_sd(tiny_senet)
    assert (
        "layer0_1.0.0.weight" in ms
        and "layer0_1.1.running_var" in ms
        and "layer4.0.conv1.weight" in ms
    )
    assert "layer3_decoder.alayers.1.arlayer.0.block.0.weight" in ms
    assert not any(k.startswith("backbone.") for k in ms)
    ours = convert_senet(ms, tiny_senet)
    expected = tiny_senet.state_dict()
    assert set(ours) == set(expected)
    assert len(ms) == len(ours) + 72
    for k, v in expected.items():
        assert torch.equal(ours[k], v), k


def _save(tmp_path: Path, sd: dict[str, torch.Tensor]) -> Path:
    p = tmp_path / "pytorch_model.pt"
    torch.save(sd, p)
    return p


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda sd: sd.pop("layer0_1.1.weight"), "backbone.bn1.weight"),  # missing
        (
            lambda sd: sd.__setitem__("aspp3.extra.weight", torch.zeros(1)),
            "aspp3.extra.weight",
        ),  # unexpected
        (
            lambda sd: sd.__setitem__("out_conv_4.weight", torch.zeros(1, 64, 1, 1)),
            "out_conv_4.weight",
        ),  # shape
        (
            lambda sd: sd.pop("layer2_decoder.alayers.0.alayer.1.block.1.running_var"),
            "alayer.1.block.1.running_var",
        ),
        (
            lambda sd: sd.__setitem__(
                "layer3_decoder.alayers.1.arlayer.0.block.0.weight", torch.zeros(128, 128, 5, 5)
            ),
            "layer3_decoder.alayers.1.arlayer.0.block.0.weight",
        ),
    ],
)
def test_senet_bad_checkpoint_names_the_key(
    tmp_path: Path, tiny_senet: SENet, edit, named: str
) -> None:
    sd = _modelscope_senet_sd(tiny_senet)
    edit(sd)
    path = _save(tmp_path, sd)
    fresh = SENet(SENET_TINY)
    with pytest.raises(CheckpointError, match=named.replace(".", r"\.")):
        load_checkpoint(fresh, path, lambda s: convert_senet(s, fresh))


def test_u2net_converter_and_bad_checkpoint(tmp_path: Path, tiny_u2net: U2Net) -> None:
    sd = tiny_u2net.state_dict()
    assert convert_u2net(sd).keys() == sd.keys()
    sd = dict(sd)
    sd["side3.weight"] = torch.zeros(1, 3, 3, 3)
    sd.pop("stage4d.rebnconv2d.bn_s1.bias")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(U2Net(U2NET_TINY), _save(tmp_path, sd), convert_u2net)
    assert "side3.weight" in str(err.value) and "stage4d.rebnconv2d.bn_s1.bias" in str(err.value)


# ---------------------------------------------------------------- transforms


@pytest.mark.parametrize("norm_size", [(48, 80), (64, 64)])
def test_preprocess_is_torchvision_resize_on_pil(norm_size: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    t = SalientTransforms(norm_size)
    for img in _images(rng, [(101, 57), (30, 200)]):
        out = t.preprocess(img)
        assert out.shape == (*norm_size, 3) and out.dtype == np.uint8
        ref = np.asarray(tvt.Resize(norm_size)(Image.fromarray(img)))
        np.testing.assert_array_equal(out, ref)


def test_postprocess_constant_map_gives_zeros() -> None:
    t = SalientTransforms((32, 32))
    with np.errstate(all="raise"):
        out = t.postprocess(np.full((32, 32), 0.7, np.float32), (40, 25))
    assert out.shape == (40, 25) and out.dtype == np.uint8
    assert not out.any()


def test_postprocess_min_max_truncate_then_linear_resize() -> None:
    rng = np.random.default_rng(1)
    m = rng.uniform(0.2, 0.9, (32, 48)).astype(np.float32)
    out = SalientTransforms((32, 48)).postprocess(m, (70, 30))
    d = torch.from_numpy(m)  # ModelScope's order of operations
    ref = (((d - d.min()) / (d.max() - d.min())).numpy() * 255).astype("uint8")
    np.testing.assert_array_equal(out, cv2.resize(ref, (30, 70)))
    assert out.shape == (70, 30)
    assert ref.min() == 0 and ref.max() == 255  # full range after min-max


# ---------------------------------------------------------------- model directories and the predictor


@pytest.fixture(scope="module")
def senet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_model_dir(tmp_path_factory.mktemp("senet"), norm_size=(64, 96), seed=3)


@pytest.fixture(scope="module")
def u2net_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_model_dir(tmp_path_factory.mktemp("u2net"), U2NET, seed=4)


def test_random_model_dir_layout(senet_dir: Path, u2net_dir: Path) -> None:
    sd = read_state_dict(senet_dir / "pytorch_model.pt")
    assert (
        len(sd) == 976
        and "layer0_1.0.0.weight" in sd
        and "layer2_decoder.alayers.0.alayer.0.block.0.weight" in sd
    )
    assert parse_config_py(senet_dir / "config.py").norm_size == (64, 96)
    assert not (u2net_dir / "config.py").exists()
    assert len(read_state_dict(u2net_dir / "pytorch_model.pt")) == 798
    assert load_transforms("salient", senet_dir).norm_size == (64, 96)
    assert load_transforms("salient", u2net_dir).norm_size == (320, 320)


@pytest.fixture(scope="module", params=["senet", "u2net"])
def predictor(request: pytest.FixtureRequest, senet_dir: Path, u2net_dir: Path):
    d = senet_dir if request.param == "senet" else u2net_dir
    return load_model("salient", d, device="cpu")


def test_predict_gives_masks_of_the_original_sizes(predictor) -> None:
    sizes = [(120, 90), (45, 160), (64, 64)]
    masks = predictor.predict(_images(np.random.default_rng(2), sizes))
    assert [m.shape for m in masks] == sizes
    assert all(m.dtype == np.uint8 for m in masks)
    assert all(m.max() > m.min() for m in masks)
    assert predictor.name == "salient"
    d = Path(predictor.weights_path).parent
    assert predictor.model_version == file_version(d / "pytorch_model.pt")


@pytest.fixture(scope="module", params=["senet", "u2net-tiny"])
def small_predictor(
    request: pytest.FixtureRequest, senet_dir: Path, tiny_u2net: U2Net
) -> SalientPredictor:
    """The real SENet at 64×96, or the predictor around a TINY U2NET at 64×64 (the real one is 320²)."""
    if request.param == "senet":
        return load_model("salient", senet_dir, device="cpu")
    weights = SalientWeights("u2net", norm_size=(64, 64))
    return SalientPredictor(tiny_u2net, weights, "tiny", torch.device("cpu"))


def test_forward_is_batch_independent(small_predictor: SalientPredictor) -> None:
    predictor = small_predictor
    pre = [
        predictor.transforms.preprocess(im)
        for im in _images(np.random.default_rng(3), [(80, 60)] * 3)
    ]
    pre[1] = pre[1][::-1].copy()  # three different inputs
    pre[2] = 255 - pre[2]
    batched = predictor.forward(pre)
    single = [predictor.forward([p])[0] for p in pre]
    for b, s in zip(batched, single, strict=True):
        assert b.shape == predictor.transforms.norm_size and b.dtype == np.float32
        np.testing.assert_allclose(b, s, atol=1e-5, rtol=0)
    assert np.abs(batched[0] - batched[1]).max() > 1e-3


def test_load_errors(tmp_path: Path, senet_dir: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_model("salient", tmp_path, device="cpu")  # no config.py → U2NET, no weights
    (tmp_path / "config.py").write_text(
        "norm_mean = [0, 0, 0]\nnorm_std = [1, 1, 1]\nnorm_size = [100, 64]\n"
    )
    with pytest.raises(SalientConfigError, match="multiples of 32"):
        load_model("salient", tmp_path, device="cpu")
    with pytest.raises(TypeError, match="batch"):
        load_model("salient", senet_dir, device="cpu", batch=3)
