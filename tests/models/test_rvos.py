"""rvos (MTTR): tiny-config forward, query batching, windowing, preprocessing and the Python API."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from vbatch import models
from vbatch.models.checkpoint import CheckpointError
from vbatch.models.rvos import TINY, owned_frames, plan_windows
from vbatch.models.rvos.config import SwinConfig, read_config
from vbatch.models.rvos.model import MTTR
from vbatch.models.rvos.modeldir import write_random_model_dir
from vbatch.models.rvos.swin import VideoSwinBackbone
from vbatch.models.rvos.text import load_tokenizer, normalize_query, tokenize
from vbatch.models.rvos.transforms import (
    RVOSTransforms,
    frame_masks,
    preprocess_frames,
    resized_size,
    select_trajectory,
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_random_model_dir(tmp_path_factory.mktemp("rvos") / "tiny", TINY, seed=0)


@pytest.fixture(scope="module")
def predictor(tiny_dir):
    return models.load_model("rvos", tiny_dir, device="cpu")


def _video(t: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def test_tiny_forward_shapes(predictor):
    torch.manual_seed(0)
    clip = torch.randn(5, 3, 42, 58)
    ids, mask = tokenize(predictor.tokenizer, ["a dog", "the person riding a bike"])
    with torch.inference_mode():
        out = predictor.model(clip, ids, mask)
    assert out["pred_masks"].shape == (5, 2, TINY.num_queries, 11, 15)
    assert out["pred_is_referred"].shape == (5, 2, TINY.num_queries, 2)
    assert torch.isfinite(out["pred_masks"]).all()


def test_backbone_strides_and_short_clips():
    cfg = SwinConfig(embed_dim=8, depths=(2, 2, 2), num_heads=(1, 2, 4), window_size=(4, 3, 3))
    net = VideoSwinBackbone(cfg).eval()
    for t in (1, 3, 6):  # shorter and longer than the temporal window
        with torch.inference_mode():
            feats = net(torch.randn(t, 3, 37, 50))
        assert [tuple(f.shape) for f in feats] == [(t, 8, 10, 13), (t, 16, 5, 7), (t, 32, 3, 4)]


def test_queries_batch_like_single_queries(predictor):
    """One forward with several queries equals one forward per query (padding is masked out)."""
    clip = preprocess_frames(_video(4, 30, 40))
    queries = ["a dog", "the small brown cat sitting next to the window"]
    both = predictor.run_network(clip, queries)
    for b, q in enumerate(queries):
        one = predictor.run_network(clip, [q])
        for k in ("pred_masks", "pred_is_referred"):
            torch.testing.assert_close(both[k][:, b], one[k][:, 0], atol=1e-5, rtol=1e-5)


def test_normalize_query():
    assert normalize_query("  A Person\tRiding \n a BIKE ") == "a person riding a bike"
    assert normalize_query("dog") == "dog"


def test_queries_are_normalised(predictor):
    clip = preprocess_frames(_video(2, 30, 40))
    a = predictor.run_network(clip, ["  The DOG  on the left"])
    b = predictor.run_network(clip, ["the dog on the left"])
    torch.testing.assert_close(a["pred_masks"], b["pred_masks"], atol=0, rtol=0)


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, []),
        (1, [(0, 1)]),
        (18, [(0, 18)]),
        (20, [(0, 20), (18, 20)]),
        (24, [(0, 24), (18, 24)]),  # a last window made only of overlap frames, as the reference
        (50, [(0, 24), (18, 42), (36, 50)]),
    ],
)
def test_plan_windows(n, expected):
    assert plan_windows(n) == expected


def test_owned_frames_is_the_overwrite_rule():
    """Window k decides exactly the frames where it was the last one written, as in the pipeline."""
    for n in range(0, 80):
        windows = plan_windows(n)
        writer = np.full(n, -1)
        for k, (start, stop) in enumerate(windows):
            writer[start:stop] = k  # the reference's pred_masks[start:start + 24] = window_masks
        owner = np.full(n, -1)
        for k, (a, b) in enumerate(owned_frames(windows)):
            assert windows[k][0] <= a <= b <= windows[k][1]
            assert (owner[a:b] == -1).all()
            owner[a:b] = k
        np.testing.assert_array_equal(owner, writer)


@pytest.mark.parametrize(
    "size", [(270, 480), (480, 270), (360, 640), (26, 338), (100, 100), (1080, 1920), (333, 500)]
)
def test_resized_size_matches_torchvision(size):
    x = torch.zeros(1, 3, *size, dtype=torch.uint8)
    assert tuple(TF.resize(x, size=360, max_size=640, antialias=True).shape[-2:]) == resized_size(
        size
    )


def test_preprocess_frame_by_frame_equals_clip():
    video = _video(3, 50, 70)
    clip = preprocess_frames(video)
    assert clip.shape == (3, 3, *resized_size((50, 70)))
    per_frame = np.stack([RVOSTransforms().preprocess(f) for f in video])
    np.testing.assert_array_equal(per_frame, clip.numpy())


def test_select_trajectory_picks_best_mean_score():
    t, b, n = 3, 2, 4
    logits = torch.zeros(t, b, n, 2)
    logits[:, 0, 2, 0] = 3.0  # query 0: slot 2 best on average
    logits[0, 1, 1, 0] = 10.0  # query 1: slot 1 wins one frame by a lot...
    logits[:, 1, 3, 0] = 0.5  # ...slot 3 every frame by a little: the mean decides (slot 1)
    masks = torch.arange(t * b * n, dtype=torch.float32).view(t, b, n, 1, 1).expand(t, b, n, 2, 2)
    chosen, slots = select_trajectory(logits, masks)
    assert slots.tolist() == [2, 1]
    assert chosen.shape == (b, t, 2, 2)
    torch.testing.assert_close(chosen[1, :, 0, 0], masks[:, 1, 1, 0, 0])


def test_frame_masks_threshold_and_size():
    logits = torch.tensor([[[[-1.0, 1.0]]]])  # (1, 1, 1, 2)
    out = frame_masks(logits, (4, 8), (2, 4))
    assert out.dtype == torch.uint8 and out.shape == (1, 1, 2, 4)
    assert out[0, 0, 0].tolist() == [0, 0, 255, 255]


def test_predict_video_api(predictor):
    video = _video(30, 16, 240, seed=3)  # a thin strip: the network input is 42x640, quick
    masks = predictor.predict_video(video, ["a person", "the dog"])
    assert masks.shape == (2, 30, 16, 240) and masks.dtype == np.uint8
    assert set(np.unique(masks)) <= {0, 255}
    # streaming window by window gives the same masks
    windows = plan_windows(30)
    for (start, stop), (a, b) in zip(windows, owned_frames(windows), strict=True):
        part = predictor.predict_window(video[start:stop], ["a person", "the dog"])
        np.testing.assert_array_equal(part[:, a - start : b - start], masks[:, a:b])
    assert predictor.predict_video(video[:0], ["a"]).shape == (1, 0, 16, 240)
    assert predictor.predict_window(video[:2], []).shape == (0, 2, 16, 240)


def test_image_api_points_to_video_api(predictor):
    with pytest.raises(NotImplementedError, match="predict_video"):
        predictor.predict([np.zeros((8, 8, 3), np.uint8)])


def test_random_model_dir_layout(tiny_dir):
    assert (tiny_dir / "configuration.json").is_file()
    assert (tiny_dir / "pytorch_model.pt").is_file()
    for f in ("config.json", "vocab.json", "merges.txt", "tokenizer.json"):
        assert (tiny_dir / "transformer_cfg_dir" / f).is_file()
    assert read_config(tiny_dir) == TINY
    # the architecture comes from the directory: a strict load of the same weights in MTTR(TINY)
    sd = MTTR(TINY).state_dict()
    assert set(sd) == set(models.load_model("rvos", tiny_dir, device="cpu").model.state_dict())


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("model", "text_encoder_type", "roberta-large", "text_encoder_type"),
        ("model", "backbone_name", "resnet50", "backbone_name"),
        ("model", "normalize_before", True, "normalize_before"),
        ("pipeline", "dataset_name", "a2d_sentences", "dataset_name"),
    ],
)
def test_unsupported_configuration(tmp_path, tiny_dir, section, key, value, message):
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    cfg = json.loads((d / "configuration.json").read_text())
    cfg[section][key] = value
    (d / "configuration.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message):
        read_config(d)


def test_tokenizer_from_vocab_and_merges_only(tmp_path, tiny_dir):
    """roberta-base's own files (vocab.json + merges.txt, no tokenizer.json) give the same ids."""
    d = tmp_path / "tok"
    d.mkdir()
    for f in ("vocab.json", "merges.txt", "config.json"):
        shutil.copy(tiny_dir / "transformer_cfg_dir" / f, d / f)
    queries = ["a person riding a bike on the road", "dog"]
    full = tokenize(load_tokenizer(tiny_dir / "transformer_cfg_dir"), queries)
    bare = tokenize(load_tokenizer(d), queries)
    for a, b in zip(full, bare, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert full[0][0, 0].item() == 0 and full[1][1, -1].item() == 0  # <s> first; padding masked
