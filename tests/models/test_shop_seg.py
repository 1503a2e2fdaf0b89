"""shop-seg: tiny-config forward, batch independence, transforms, converter and loader errors (seconds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vbatch.models.checkpoint import (
    CheckpointError,
    check_state_dict,
    file_version,
    load_checkpoint,
)
from vbatch.models.shop_seg import (
    FULL,
    TINY,
    ShopSegConfig,
    ShopSegNet,
    activation_bytes_per_image,
    load,
    load_transforms,
)
from vbatch.models.shop_seg.config import WEIGHTS, read_config
from vbatch.models.shop_seg.convert import convert_modelscope, to_modelscope
from vbatch.models.shop_seg.modeldir import write_random_model_dir
from vbatch.models.shop_seg.transforms import ShopSegTransforms, crop_size

SIZES = [(100, 200), (300, 120), (50, 50), (128, 128)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_model_dir(tmp_path_factory.mktemp("shop_seg") / "tiny", TINY, seed=0)


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out = []
    for h, w in SIZES:
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        base = np.stack([200 * xx, 150 * yy, 100 + 50 * np.sin(6 * xx * yy)], axis=-1)
        out.append(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))
    return out


def modelscope_keys(config: ShopSegConfig) -> dict[str, tuple[int, ...]]:
    """ModelScope ``SHOPSEG``'s state-dict names and shapes, written from its module structure."""
    c, k = config, config.num_classes
    keys: dict[str, tuple[int, ...]] = {}

    def ln(prefix: str, dim: int) -> None:
        keys[prefix + "weight"] = (dim,)
        keys[prefix + "bias"] = (dim,)

    def bn(prefix: str, dim: int) -> None:
        ln(prefix, dim)
        keys.update({prefix + "running_mean": (dim,), prefix + "running_var": (dim,)})
        keys[prefix + "num_batches_tracked"] = ()

    def clip_blocks(prefix: str, depth: int, d: int) -> None:
        for i in range(depth):
            p = f"{prefix}transformer.resblocks.{i}."
            keys[p + "attn.in_proj_weight"] = (3 * d, d)
            keys[p + "attn.in_proj_bias"] = (3 * d,)
            keys[p + "attn.out_proj.weight"] = (d, d)
            keys[p + "attn.out_proj.bias"] = (d,)
            ln(p + "ln_1.", d)
            ln(p + "ln_2.", d)
            keys[p + "mlp.c_fc.weight"] = (4 * d, d)
            keys[p + "mlp.c_fc.bias"] = (4 * d,)
            keys[p + "mlp.c_proj.weight"] = (d, 4 * d)
            keys[p + "mlp.c_proj.bias"] = (d,)

    keys["contexts"] = (1, c.num_context, c.text_width)
    keys["gamma"] = (c.embed_dim,)
    w, g = c.vision_width, c.image_size // c.patch_size
    keys["backbone.class_embedding"] = (w,)
    keys["backbone.positional_embedding"] = (g * g + 1, w)
    keys["backbone.proj"] = (w, c.embed_dim)
    keys["backbone.conv1.weight"] = (w, 3, c.patch_size, c.patch_size)
    ln("backbone.ln_pre.", w)
    clip_blocks("backbone.", c.vision_depth, w)
    ln("backbone.ln_post.", w)
    ln("backbone.fpn1.0.", w)
    keys |= {"backbone.fpn1.1.weight": (w, w, 2, 2), "backbone.fpn1.1.bias": (w,)}
    bn("backbone.fpn1.2.", w)
    keys |= {"backbone.fpn1.4.weight": (w, w, 2, 2), "backbone.fpn1.4.bias": (w,)}
    ln("backbone.fpn2.0.", w)
    keys |= {"backbone.fpn2.1.weight": (w, w, 2, 2), "backbone.fpn2.1.bias": (w,)}
    ln("backbone.fpn3.", w)
    ln("backbone.fpn4.0.", w)
    t = c.text_width
    keys["text_encoder.positional_embedding"] = (c.text_context_length, t)
    keys["text_encoder.text_projection"] = (t, c.embed_dim)
    clip_blocks("text_encoder.", c.text_depth, t)
    keys["text_encoder.token_embedding.weight"] = (c.vocab_size, t)
    ln("text_encoder.ln_final.", t)
    e, d = c.embed_dim, c.decoder_width
    ln("context_decoder.memory_proj.0.", e)
    keys |= {
        "context_decoder.memory_proj.1.weight": (d, e),
        "context_decoder.memory_proj.1.bias": (d,),
    }
    ln("context_decoder.memory_proj.2.", d)
    ln("context_decoder.text_proj.0.", e)
    keys |= {"context_decoder.text_proj.1.weight": (d, e), "context_decoder.text_proj.1.bias": (d,)}
    for i in range(c.decoder_depth):
        p = f"context_decoder.decoder.{i}."
        for attn in ("self_attn", "cross_attn"):
            for proj in ("q_proj", "k_proj", "v_proj", "proj"):
                keys[f"{p}{attn}.{proj}.weight"] = (d, d)
            keys[f"{p}{attn}.proj.bias"] = (d,)
        for n in (1, 2, 3):
            ln(f"{p}norm{n}.", d)
        keys |= {p + "mlp.0.weight": (4 * d, d), p + "mlp.0.bias": (4 * d,)}
        keys |= {p + "mlp.3.weight": (d, 4 * d), p + "mlp.3.bias": (d,)}
    ln("context_decoder.out_proj.0.", d)
    keys |= {"context_decoder.out_proj.1.weight": (e, d), "context_decoder.out_proj.1.bias": (e,)}
    f = c.fpn_channels
    for i in range(4):
        cin = w + (k if i == c.score_level else 0)
        keys |= {
            f"neck.lateral_convs.{i}.conv.weight": (f, cin, 1, 1),
            f"neck.lateral_convs.{i}.conv.bias": (f,),
        }
        keys |= {
            f"neck.fpn_convs.{i}.conv.weight": (f, f, 3, 3),
            f"neck.fpn_convs.{i}.conv.bias": (f,),
        }
    keys |= {"head_fpn.conv_seg.weight": (k, f, 1, 1), "head_fpn.conv_seg.bias": (k,)}
    for i, convs in enumerate((1, 1, 2, 3)):
        for j in range(convs):
            p = f"head_fpn.scale_heads.{i}.{2 * j if i else j}."
            keys[p + "conv.weight"] = (f, f, 3, 3)
            bn(p + "bn.", f)
    return keys


@pytest.mark.parametrize("config", [TINY, FULL], ids=["tiny", "full"])
def test_converter_consumes_every_modelscope_key(config: ShopSegConfig) -> None:
    with torch.device("meta"):
        model = ShopSegNet(config)
    ms = {k: torch.empty(s, device="meta") for k, s in modelscope_keys(config).items()}
    if config == FULL:
        assert len(ms) == 456  # what ModelScope's SHOPSEG.state_dict() holds
    ours = convert_modelscope(ms)
    assert len(ours) == len(ms)
    check_state_dict(model, ours, "synthetic ModelScope state dict")
    assert set(ours) == set(model.state_dict())
    back = to_modelscope(model.state_dict())
    assert {k: tuple(v.shape) for k, v in back.items()} == modelscope_keys(config)


def test_converter_errors_name_every_problem(tiny_dir: Path, tmp_path: Path) -> None:
    sd = torch.load(tiny_dir / WEIGHTS.checkpoint, weights_only=True)
    del sd["backbone.ln_pre.bias"]
    sd["backbone.extra_head.weight"] = torch.zeros(3)
    sd["gamma"] = torch.zeros(TINY.embed_dim + 1)
    bad = tmp_path / "bad.bin"
    torch.save(sd, bad)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(ShopSegNet(TINY), bad, convert_modelscope)
    msg = str(err.value)
    assert "visual.norm_pre.bias" in msg  # missing
    assert "modelscope.backbone.extra_head.weight" in msg  # unexpected, under its ModelScope name
    assert "text_gamma" in msg and f"({TINY.embed_dim + 1},)" in msg  # mis-shaped


def test_tiny_forward_shapes(tiny_dir: Path, images: list[np.ndarray]) -> None:
    pred = load(tiny_dir, device="cpu")
    assert pred.model_version == file_version(tiny_dir / WEIGHTS.checkpoint)
    inputs = [pred.transforms.preprocess(im) for im in images]
    assert all(x.shape == (128, 128, 4) and x.dtype == np.uint8 for x in inputs)
    logits = pred.logits(inputs)
    assert logits.shape == (len(images), 2, 32, 32) and torch.isfinite(logits).all()
    maps = pred.forward(inputs)
    for a, b in zip(maps, pred.forward(np.stack(inputs)), strict=True):  # a Ray batch column
        np.testing.assert_array_equal(a, b)
    assert pred.forward([]) == []
    assert all(
        m.shape == (128, 128) and m.dtype == np.uint8 and set(np.unique(m)) <= {0, 1} for m in maps
    )
    masks = pred.predict(images)
    for im, m in zip(images, masks, strict=True):
        assert m.shape == im.shape[:2] and m.dtype == np.uint8 and set(np.unique(m)) <= {0, 255}
    # random weights still give both classes somewhere (otherwise parity would prove little)
    assert 0.02 < np.mean(np.concatenate([m.ravel() for m in masks]) > 0) < 0.98


def test_batch_independence(tiny_dir: Path, images: list[np.ndarray]) -> None:
    pred = load(tiny_dir, device="cpu")
    inputs = [pred.transforms.preprocess(im) for im in images]
    batched = pred.logits(inputs)
    single = torch.cat([pred.logits([x]) for x in inputs])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)
    for a, b in zip(pred.forward(inputs), [pred.forward([x])[0] for x in inputs], strict=True):
        np.testing.assert_array_equal(a, b)


def test_prompts_matter_and_are_cached(tiny_dir: Path, images: list[np.ndarray]) -> None:
    pred = load(tiny_dir, device="cpu")
    assert pred.model.prompt_features.shape == (2, TINY.embed_dim)
    inputs = [pred.transforms.preprocess(images[0])]
    before = pred.logits(inputs)
    pred.model.prompt_features = pred.model.prompt_features.flip(0)
    assert (pred.logits(inputs) - before).abs().max() > 1e-3


def test_precision_options(tiny_dir: Path, images: list[np.ndarray]) -> None:
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        load(tiny_dir, device="cpu", precision="fp16")
    with pytest.raises(ValueError, match="precision"):
        load(tiny_dir, device="cpu", precision="int8")
    fp32 = load(tiny_dir, device="cpu")
    bf16 = load(tiny_dir, device="cpu", precision="bf16")
    inputs = [fp32.transforms.preprocess(im) for im in images]
    a, b = fp32.forward(inputs), bf16.forward(inputs)
    agree = np.mean(np.concatenate([(x == y).ravel() for x, y in zip(a, b, strict=True)]))
    assert agree > 0.95, agree


def test_preprocess_matches_reference_recipe() -> None:
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)
    tf = ShopSegTransforms(1024)
    out = tf.preprocess(img)
    ch, cw = crop_size(300, 500, 1024)
    assert (ch, cw) == (614, 1024)  # int(1024 / 500 * 300)
    expected = np.asarray(Image.fromarray(img).resize((cw, ch), Image.BILINEAR))
    np.testing.assert_array_equal(out[:ch, :cw, :3], expected)
    assert (out[:ch, :cw, 3] == 255).all() and not out[ch:].any() and not out[:, cw:].any()
    # normalisation then zero padding, as the reference's float32 numpy code does it
    x = ShopSegNet(TINY).normalize(torch.from_numpy(out[None]))[0].numpy()
    ref = np.zeros((1024, 1024, 3), np.float32)
    ref[:ch, :cw] = (
        expected.astype(np.float32) / 255.0 - np.array(WEIGHTS.mean, np.float32)
    ) / np.array(WEIGHTS.std, np.float32)
    np.testing.assert_allclose(x.transpose(1, 2, 0), ref, atol=1e-6, rtol=0)


def test_postprocess_crops_resizes_and_thresholds() -> None:
    tf = ShopSegTransforms(128)
    ch, cw = crop_size(60, 90, 128)  # (85, 128)
    out = np.zeros((128, 128), np.uint8)
    out[ch:] = 1  # foreground only in the padding: must not show
    assert not tf.postprocess(out, (60, 90)).any()
    out[: ch // 2, : cw // 2] = 1  # top-left quarter of the valid region
    mask = tf.postprocess(out, (60, 90))
    assert mask.shape == (60, 90) and set(np.unique(mask)) == {0, 255}
    assert mask[:25, :40].all() and not mask[35:].any() and not mask[:, 50:].any()


def test_config_side_file(tiny_dir: Path, tmp_path: Path) -> None:
    assert read_config(tiny_dir) == TINY
    assert load_transforms(tiny_dir).image_size == TINY.image_size
    assert read_config(tmp_path) == FULL  # a ModelScope directory has no side file
    (tmp_path / WEIGHTS.config_file).write_text('{"image_size": 64, "depth_of_field": 3}')
    with pytest.raises(ValueError, match="depth_of_field"):
        read_config(tmp_path)
    assert (tiny_dir / WEIGHTS.vocab).is_file() and (tiny_dir / "configuration.json").is_file()


def test_activation_estimate() -> None:
    fp32 = activation_bytes_per_image(FULL, "fp32")
    bf16 = activation_bytes_per_image(FULL, "bf16")
    assert 0.2e9 < fp32 < 4e9 and bf16 < fp32
    assert activation_bytes_per_image(TINY) < fp32 / 50
    with pytest.raises(ValueError):
        activation_bytes_per_image(FULL, "fp8")


def test_missing_vocabulary_is_named(tiny_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "no_vocab"
    d.mkdir()
    for name in (WEIGHTS.checkpoint, WEIGHTS.config_file):
        (d / name).symlink_to(tiny_dir / name)
    with pytest.raises(FileNotFoundError, match=WEIGHTS.vocab):
        load(d, device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(tiny_dir: Path, images: list[np.ndarray]) -> None:
    cpu = load(tiny_dir, device="cpu")
    inputs = [cpu.transforms.preprocess(im) for im in images]
    ref_logits, ref_maps = cpu.logits(inputs), cpu.forward(inputs)
    gpu = load(tiny_dir, device="cuda")
    # fp32 on CUDA: cuDNN convolutions run in TF32 by default (as they do for the reference)
    torch.testing.assert_close(gpu.logits(inputs).cpu(), ref_logits, atol=1e-2, rtol=1e-2)
    for precision in ("bf16", "fp16"):
        maps = load(tiny_dir, device="cuda", precision=precision).forward(inputs)
        agree = np.mean(
            np.concatenate([(a == b).ravel() for a, b in zip(maps, ref_maps, strict=True)])
        )
        assert agree > 0.95, (precision, agree)
