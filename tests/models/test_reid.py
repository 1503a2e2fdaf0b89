"""Fast tests of the PASS re-ID model: tiny forward, configuration parsing, converter, transforms.

Parity with ModelScope at full size is in ``test_reid_parity.py``.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from vbatch.models.checkpoint import CheckpointError, check_state_dict
from vbatch.models.registry import load_model, load_transforms
from vbatch.models.reid import (
    EMBED_DIM,
    FULL,
    TINY,
    ReidConfig,
    ReidConfigError,
    ReidNet,
    ReidPredictor,
    ViTCfg,
    load,
)
from vbatch.models.reid.config import config_from_modelscope, config_to_modelscope, read_config
from vbatch.models.reid.convert import from_modelscope, to_modelscope
from vbatch.models.reid.modeldir import write_random_model_dir


def modelscope_shapes(cfg: ReidConfig) -> dict[str, tuple[int, ...]]:
    """The state dict of ModelScope's ``PASS`` for ``cfg``, written out from pass_model.py and
    transreid_model.py (independently of our converter)."""
    d, n = cfg.vit.embed_dim, cfg.num_patches
    hidden = int(d * cfg.vit.mlp_ratio)
    shapes: dict[str, tuple[int, ...]] = {
        "base.cls_token": (1, 1, d),
        "base.part_token1": (1, 1, d),
        "base.part_token2": (1, 1, d),
        "base.part_token3": (1, 1, d),
        "base.cls_pos": (1, 1, d),
        "base.part1_pos": (1, 1, d),
        "base.part2_pos": (1, 1, d),
        "base.part3_pos": (1, 1, d),
        "base.pos_embed": (1, n, d),
        "base.patch_embed.proj.weight": (d, 3, 16, 16),
        "base.patch_embed.proj.bias": (d,),
        "base.norm.weight": (d,),
        "base.norm.bias": (d,),
        "base.fc.weight": (1000, d),
        "base.fc.bias": (1000,),
        "classifier.weight": (cfg.num_classes, cfg.embed_dim),
    }
    for i in range(cfg.vit.depth):
        p = f"base.blocks.{i}."
        shapes.update(
            {
                p + "norm1.weight": (d,),
                p + "norm1.bias": (d,),
                p + "attn.qkv.weight": (3 * d, d),
                p + "attn.qkv.bias": (3 * d,),
                p + "attn.proj.weight": (d, d),
                p + "attn.proj.bias": (d,),
                p + "norm2.weight": (d,),
                p + "norm2.bias": (d,),
                p + "mlp.fc1.weight": (hidden, d),
                p + "mlp.fc1.bias": (hidden,),
                p + "mlp.fc2.weight": (d, hidden),
                p + "mlp.fc2.bias": (d,),
            }
        )
    bns = (
        ["bottleneck", "bottleneck_1", "bottleneck_2", "bottleneck_3"]
        if cfg.multi_neck
        else ["bottleneck"]
    )
    bn_dim = d if cfg.multi_neck else cfg.embed_dim
    for bn in bns:
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{bn}.{leaf}"] = (bn_dim,)
        shapes[f"{bn}.num_batches_tracked"] = ()
    return shapes


def synthetic_modelscope_sd(cfg: ReidConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.randint(0, 100, s, generator=g)
        if k.endswith("num_batches_tracked")
        else torch.randn(s, generator=g)
        for k, s in modelscope_shapes(cfg).items()
    }


def person_images(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for h, w in ((120, 50), (64, 32), (40, 90), (300, 101))
    ]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_model_dir(tmp_path_factory.mktemp("reid_tiny"), TINY, seed=0)


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> ReidPredictor:
    return load(tiny_dir, device="cpu")


# ---------------------------------------------------------------------------------------------------
# forward


def test_tiny_predict_shapes_and_determinism(tiny_dir: Path) -> None:
    pred = load_model("reid", tiny_dir, "cpu")
    assert isinstance(pred, ReidPredictor) and pred.name == "reid"
    assert len(pred.model_version) == 12
    images = person_images()
    out = pred.predict(images)
    assert len(out) == len(images)
    for e in out:
        assert e.shape == (TINY.embed_dim,) == (2 * 64,)
        assert e.dtype == np.float32 and np.isfinite(e).all()
    # a different image gives a different embedding; the same image the same one
    assert np.abs(out[0] - out[1]).max() > 1e-3
    again = load_model("reid", tiny_dir, "cpu").predict(images[:1])
    np.testing.assert_array_equal(again[0], out[0])
    assert pred.predict([]) == []


def test_batch_independence(tiny: ReidPredictor) -> None:
    inputs = [tiny.transforms.preprocess(im) for im in person_images(1)]
    batched = np.stack(tiny.forward(inputs))
    single = np.stack([tiny.forward([x])[0] for x in inputs])
    assert np.abs(batched - single).max() <= 1e-5
    batched, single = batched.astype(np.float64), single.astype(np.float64)
    cos = (
        (batched * single).sum(1) / np.linalg.norm(batched, axis=1) / np.linalg.norm(single, axis=1)
    )
    assert cos.min() >= 0.99999


def test_forward_rejects_wrong_input_size(tiny: ReidPredictor) -> None:
    with pytest.raises(ValueError, match=r"\(64, 32, 3\) uint8"):
        tiny.forward([np.zeros((32, 64, 3), np.uint8)])
    with pytest.raises(ValueError, match="expected input"):
        tiny.net.embed(torch.zeros(1, 3, 32, 64))


def test_neck_feat_after_differs_and_uses_bn(tmp_path: Path) -> None:
    """The same weights give different embeddings before/after the neck, and 'after' is the BN of the
    per-token features fused (multi-neck) — checked against an explicit computation."""
    cfg_after = replace(TINY, neck_feat="after")
    net_b = ReidNet(TINY).eval()
    net_a = ReidNet(cfg_after).eval()
    from vbatch.models.reid.modeldir import randomize_

    randomize_(net_b, torch.Generator().manual_seed(3))
    net_a.load_state_dict(net_b.state_dict())
    x = torch.randint(0, 256, (2, 3, 64, 32), dtype=torch.uint8)
    with torch.no_grad():
        tokens = net_b.backbone(net_b.normalize(x))
        before, after = net_b(x), net_a(x)

        def bn(m: torch.nn.BatchNorm1d, v: torch.Tensor) -> torch.Tensor:
            return (v - m.running_mean) / torch.sqrt(m.running_var + m.eps) * m.weight + m.bias

        neck = net_b.neck
        parts = [bn(neck.part_bns[i], tokens[:, i + 1]) for i in range(3)]
        expect_after = torch.cat((bn(neck.bn, tokens[:, 0]), sum(parts) / 3), 1)
        expect_before = torch.cat((tokens[:, 0], tokens[:, 1:].mean(1)), 1)
    assert (before - after).abs().max() > 0.1
    torch.testing.assert_close(before, expect_before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after, expect_after, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# transforms


def test_preprocess_resizes_to_height_width_keeping_rgb(tiny: ReidPredictor) -> None:
    img = np.zeros((300, 100, 3), np.uint8)
    img[:150] = (255, 0, 0)  # top half red
    img[150:] = (0, 0, 255)  # bottom half blue
    out = tiny.transforms.preprocess(img)
    assert out.shape == (64, 32, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:28], np.broadcast_to([255, 0, 0], (28, 32, 3)))
    np.testing.assert_array_equal(out[36:], np.broadcast_to([0, 0, 255], (28, 32, 3)))


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((10, 10), np.uint8),
        np.zeros((10, 10, 4), np.uint8),
        np.zeros((10, 10, 3), np.float32),
        np.zeros((0, 5, 3), np.uint8),
    ],
)
def test_preprocess_rejects(tiny: ReidPredictor, bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        tiny.transforms.preprocess(bad)


def test_postprocess_identity(tiny_dir: Path) -> None:
    t = load_transforms("reid", tiny_dir)
    e = np.arange(TINY.embed_dim, dtype=np.float32)
    out = t.postprocess(e, (100, 40))
    np.testing.assert_array_equal(out, e)
    assert out.dtype == np.float32
    with pytest.raises(ValueError, match="shape"):
        t.postprocess(np.zeros(5, np.float32), (100, 40))


def test_normalisation_uses_configured_mean_std() -> None:
    cfg = replace(TINY, pixel_mean=(0.485, 0.456, 0.406), pixel_std=(0.229, 0.224, 0.225))
    net = ReidNet(cfg)
    x = (
        torch.tensor([0, 128, 255], dtype=torch.uint8)
        .view(1, 3, 1, 1)
        .expand(1, 3, 2, 2)
        .contiguous()
    )
    y = net.normalize(x)
    expect = (torch.tensor([0, 128, 255]) / 255 - torch.tensor(cfg.pixel_mean)) / torch.tensor(
        cfg.pixel_std
    )
    torch.testing.assert_close(y[0, :, 0, 0], expect)
    with pytest.raises(TypeError):
        net.normalize(x.float())


# ---------------------------------------------------------------------------------------------------
# configuration.json


def test_presets() -> None:
    assert EMBED_DIM == FULL.embed_dim == 1536
    assert FULL.grid == (16, 8) and FULL.image_size == (256, 128)
    assert TINY.grid == (5, 2)  # (64 - 16) // 12 + 1, (32 - 16) // 12 + 1: overlapping patches
    mean_cfg = ReidConfig(feat_fusion="mean")
    assert mean_cfg.embed_dim == 768


@pytest.mark.parametrize(
    "cfg", [FULL, TINY, ReidConfig(feat_fusion="mean", multi_neck=False, neck_feat="after")]
)
def test_config_roundtrip(cfg: ReidConfig, tmp_path: Path) -> None:
    obj = config_to_modelscope(cfg)
    assert ("vbatch_backbone" in obj) == (cfg.vit != ViTCfg())
    (tmp_path / "configuration.json").write_text(json.dumps(obj))
    assert read_config(tmp_path) == cfg


REQUIRED = [
    "model.type",
    "model.cfg",
    "model.cfg.INPUT.SIZE_TRAIN",
    "model.cfg.INPUT.SIZE_TEST",
    "model.cfg.INPUT.PIXEL_MEAN",
    "model.cfg.INPUT.PIXEL_STD",
    "model.cfg.MODEL.SIE_COE",
    "model.cfg.MODEL.STRIDE_SIZE",
    "model.cfg.MODEL.DROP_PATH",
    "model.cfg.MODEL.DROP_OUT",
    "model.cfg.MODEL.ATT_DROP_RATE",
    "model.cfg.MODEL.GEM_POOLING",
    "model.cfg.MODEL.STEM_CONV",
    "model.cfg.MODEL.DROPOUT_RATE",
    "model.cfg.MODEL.MULTI_NECK",
    "model.cfg.MODEL.FEAT_FUSION",
    "model.cfg.TEST.NECK_FEAT",
    "model.cfg.DATASETS.NUM_CLASSES",
]


def _edit(obj: dict, path: str, value: object = ..., delete: bool = False) -> dict:
    obj = copy.deepcopy(obj)
    *parents, leaf = path.split(".")
    node = obj
    for p in parents:
        node = node[p]
    if delete:
        del node[leaf]
    else:
        node[leaf] = value
    return obj


@pytest.mark.parametrize("path", REQUIRED)
def test_config_missing_option(path: str) -> None:
    obj = _edit(config_to_modelscope(FULL), path, delete=True)
    with pytest.raises(ReidConfigError, match=f"missing '{path}'"):
        config_from_modelscope(obj, "x/configuration.json")


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("model.type", "other", "not 'passvitb'"),
        (
            "model.cfg.INPUT.SIZE_TEST",
            [128, 64],
            "SIZE_TEST' \\[128, 64\\] differs from 'INPUT.SIZE_TRAIN'",
        ),
        ("model.cfg.INPUT.SIZE_TRAIN", 256, "SIZE_TRAIN' must be \\[height, width\\]"),
        ("model.cfg.INPUT.SIZE_TEST", [8, 8], "integers >= 16"),
        ("model.cfg.INPUT.PIXEL_MEAN", [0.5, 0.5], "PIXEL_MEAN' must be three numbers"),
        ("model.cfg.INPUT.PIXEL_STD", [0.5, 0.0, 0.5], "PIXEL_STD' must be three positive numbers"),
        ("model.cfg.MODEL.STRIDE_SIZE", [0, 16], "STRIDE_SIZE' must be a positive integer"),
        ("model.cfg.MODEL.STRIDE_SIZE", "16", "STRIDE_SIZE' must be a positive integer"),
        ("model.cfg.MODEL.SIE_COE", None, "SIE_COE' must be a number"),
        ("model.cfg.MODEL.DROP_PATH", 1.5, "DROP_PATH' must be a rate"),
        ("model.cfg.MODEL.GEM_POOLING", True, "GEM_POOLING' true is not supported"),
        ("model.cfg.MODEL.GEM_POOLING", "no", "GEM_POOLING' must be true or false"),
        ("model.cfg.MODEL.STEM_CONV", True, "STEM_CONV' true is not supported"),
        ("model.cfg.MODEL.MULTI_NECK", "yes", "MULTI_NECK' must be true or false"),
        ("model.cfg.MODEL.FEAT_FUSION", "max", "FEAT_FUSION' must be one of \\['cat', 'mean'\\]"),
        ("model.cfg.TEST.NECK_FEAT", "middle", "NECK_FEAT' must be one of \\['before', 'after'\\]"),
        ("model.cfg.DATASETS.NUM_CLASSES", 0, "NUM_CLASSES' must be a positive integer"),
        ("vbatch_backbone", {"embed_dim": 65, "num_heads": 2}, "divisible by num_heads"),
        ("vbatch_backbone", {"width": 3}, "unknown 'vbatch_backbone' entries \\['width'\\]"),
        ("vbatch_backbone", [64], "'vbatch_backbone' must be an object"),
    ],
)
def test_config_invalid_option(path: str, value: object, message: str) -> None:
    obj = _edit(config_to_modelscope(FULL), path, value)
    with pytest.raises(ReidConfigError, match=message) as e:
        config_from_modelscope(obj, "x/configuration.json")
    assert "x/configuration.json" in str(e.value)


def test_config_scalar_stride_and_bad_files(tmp_path: Path) -> None:
    obj = _edit(config_to_modelscope(FULL), "model.cfg.MODEL.STRIDE_SIZE", 12)
    assert config_from_modelscope(obj).stride == (12, 12)
    with pytest.raises(ReidConfigError, match="not found"):
        read_config(tmp_path)
    (tmp_path / "configuration.json").write_text("{not json")
    with pytest.raises(ReidConfigError, match="cannot read as JSON"):
        load(tmp_path, device="cpu")


def test_bf16_precision_close_to_fp32(tiny_dir: Path, tiny: ReidPredictor) -> None:
    half = load(tiny_dir, device="cpu", precision="bf16")
    inputs = [tiny.transforms.preprocess(im) for im in person_images(3)]
    ref = np.stack(tiny.forward(inputs)).astype(np.float64)
    out = np.stack(half.forward(inputs))
    assert out.dtype == np.float32
    assert not np.array_equal(out, ref)  # autocast really ran in bf16
    cos = (out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.99


def test_load_options(tiny_dir: Path) -> None:
    with pytest.raises(TypeError, match="fast"):
        load(tiny_dir, device="cpu", fast=True)
    with pytest.raises(ValueError, match="precision"):
        load(tiny_dir, device="cpu", precision="int8")


# ---------------------------------------------------------------------------------------------------
# converter and strict loading


@pytest.mark.parametrize("cfg", [TINY, replace(TINY, multi_neck=False, feat_fusion="mean")])
def test_converter_consumes_every_key(cfg: ReidConfig) -> None:
    sd = synthetic_modelscope_sd(cfg)
    ours = from_modelscope(sd)
    net = ReidNet(cfg)
    check_state_dict(net, ours, "synthetic")  # nothing missing, unexpected or mis-shaped
    net.load_state_dict(ours, strict=True)
    # the four tokens and positions are stacked in order [cls, part1, part2, part3]
    torch.testing.assert_close(net.backbone.tokens[:, 2:3], sd["base.part_token2"], rtol=0, atol=0)
    torch.testing.assert_close(net.backbone.token_pos[:, 0:1], sd["base.cls_pos"], rtol=0, atol=0)
    torch.testing.assert_close(
        net.backbone.patch_proj.weight, sd["base.patch_embed.proj.weight"], rtol=0, atol=0
    )
    torch.testing.assert_close(
        net.neck.bn.running_var, sd["bottleneck.running_var"], rtol=0, atol=0
    )
    # the converter is pure
    assert set(sd) == set(modelscope_shapes(cfg))


def test_converter_full_key_set() -> None:
    with torch.device("meta"):
        net = ReidNet(FULL)
        sd = {k: torch.empty(s) for k, s in modelscope_shapes(FULL).items()}
    check_state_dict(net, from_modelscope(sd), "full-size synthetic")


def test_to_modelscope_inverts_converter() -> None:
    sd = synthetic_modelscope_sd(TINY)
    back = to_modelscope(from_modelscope(sd))
    dropped = {"classifier.weight", "base.fc.weight", "base.fc.bias"}
    assert set(back) == set(sd) - dropped
    for k, v in back.items():
        torch.testing.assert_close(v, sd[k], rtol=0, atol=0)


def _check_fails(sd: dict[str, torch.Tensor], *fragments: str) -> None:
    net = ReidNet(TINY)
    with pytest.raises(CheckpointError) as e:
        check_state_dict(net, from_modelscope(sd), "synthetic")
    for f in fragments:
        assert f in str(e.value), (f, str(e.value))


def test_converter_missing_token() -> None:
    sd = synthetic_modelscope_sd(TINY)
    del sd["base.part_token2"]
    with pytest.raises(CheckpointError, match=r"missing keys: base\.part_token2"):
        from_modelscope(sd)


def test_converter_misshaped_token() -> None:
    sd = synthetic_modelscope_sd(TINY)
    sd["base.part2_pos"] = torch.zeros(1, 2, 64)
    with pytest.raises(CheckpointError, match=r"base.part2_pos \(1, 2, 64\)"):
        from_modelscope(sd)


def test_converter_missing_unexpected_misshaped() -> None:
    sd = synthetic_modelscope_sd(TINY)
    del sd["base.blocks.1.mlp.fc1.weight"]
    _check_fails(sd, "missing keys (1)", "blocks.1.mlp.fc1.weight")
    sd = synthetic_modelscope_sd(TINY)
    sd["base.extra.weight"] = torch.zeros(3)
    _check_fails(sd, "unexpected keys (1)", "base.extra.weight")
    sd = synthetic_modelscope_sd(TINY)
    sd["base.pos_embed"] = torch.zeros(1, 9, 64)
    _check_fails(sd, "shape mismatches (1)", "pos_embed (checkpoint (1, 9, 64), model (1, 10, 64))")
    sd = synthetic_modelscope_sd(TINY)
    del sd["bottleneck_3.running_mean"]
    _check_fails(sd, "missing keys (1)", "running_mean")


def test_training_only_keys_are_optional(tmp_path: Path) -> None:
    sd = synthetic_modelscope_sd(TINY)
    for k in ("classifier.weight", "base.fc.weight", "base.fc.bias"):
        del sd[k]
    check_state_dict(ReidNet(TINY), from_modelscope(sd), "stripped")


def test_written_dir_has_modelscope_layout(tiny_dir: Path) -> None:
    sd = torch.load(tiny_dir / "pytorch_model.pt", map_location="cpu", weights_only=True)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes == modelscope_shapes(TINY)
    obj = json.loads((tiny_dir / "configuration.json").read_text())
    assert obj["task"] == "image-reid-person" and obj["model"]["type"] == "passvitb"
    assert obj["pipeline"]["type"] == "passvitb-image-reid-person"


def test_load_rejects_checkpoint_of_other_config(tiny_dir: Path, tmp_path: Path) -> None:
    other = replace(TINY, stride=(16, 16))  # 4x2 patches instead of 5x2
    (tmp_path / "configuration.json").write_text(json.dumps(config_to_modelscope(other)))
    (tmp_path / "pytorch_model.pt").symlink_to(tiny_dir / "pytorch_model.pt")
    with pytest.raises(
        CheckpointError,
        match=r"backbone.pos_embed \(checkpoint \(1, 10, 64\), model \(1, 8, 64\)\)",
    ):
        load(tmp_path, device="cpu")


def test_load_strips_dataparallel_prefix(
    tiny_dir: Path, tiny: ReidPredictor, tmp_path: Path
) -> None:
    sd = torch.load(tiny_dir / "pytorch_model.pt", map_location="cpu", weights_only=True)
    torch.save({"module." + k: v for k, v in sd.items()}, tmp_path / "pytorch_model.pt")
    (tmp_path / "configuration.json").write_text((tiny_dir / "configuration.json").read_text())
    x = [tiny.transforms.preprocess(im) for im in person_images(2)[:2]]
    np.testing.assert_array_equal(
        np.stack(load(tmp_path, device="cpu").forward(x)), np.stack(tiny.forward(x))
    )
