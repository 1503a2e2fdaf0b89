"""shop-seg against ModelScope 1.40.2 (the oracle): tokenizer ids, network logits and end-to-end masks.

The oracle script (tests/oracle/shop_seg_ref.py) builds the reference with every parameter and buffer
random, saves it in ModelScope's layout, and runs its pipeline on synthetic photos of 3 sizes/aspect
ratios, catching the network's input and logits with hooks. We load the same directory strictly,
run all 3 images as ONE batch (the reference ran them one at a time) and compare.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.oracle.runner import run_oracle
from vbatch.models.shop_seg import load
from vbatch.models.shop_seg.model import FULL, WEIGHTS
from vbatch.models.shop_seg.tokenizer import ClipTokenizer

logger = logging.getLogger(__name__)

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tokenizer's and the full model's references, from one oracle process."""
    out = tmp_path_factory.mktemp("shop_seg")
    run_oracle("shop_seg_ref.py", "tokens,model", out, "0")
    return out


def test_tokenizer_matches_reference(oracle: Path) -> None:
    ref = np.load(oracle / "tokens.npz")
    texts = [str(t) for t in ref["texts"]]
    ours = ClipTokenizer(oracle / WEIGHTS.vocab)(texts, FULL.prompt_length)
    assert texts[:2] == list(FULL.prompts)
    np.testing.assert_array_equal(ours[:2], ref["ids"][:2])  # the model's prompts
    np.testing.assert_array_equal(ours, ref["ids"])  # and ordinary text, truncation included


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a > 0, b > 0).sum()
    return float(np.logical_and(a > 0, b > 0).sum() / union) if union else 1.0


@pytest.mark.slow
def test_full_size_parity(oracle: Path, record_property: Callable[[str, object], None]) -> None:
    ref = np.load(oracle / "ref.npz")
    pred = load(oracle / "model", device="cpu")
    images = [ref[f"image{i}"] for i in range(3)]
    inputs = [pred.transforms.preprocess(im) for im in images]

    # preprocessing: our uint8 canvas normalised on the device == the reference's float input
    x = pred.model.normalize(torch.from_numpy(inputs[0][None]))
    np.testing.assert_allclose(x.numpy(), ref["input0"], atol=1e-6, rtol=0)

    logits = pred.logits(inputs)  # one batch of 3
    maps = pred.model.segment(logits).numpy()
    for i, im in enumerate(images):
        diff = float(np.abs(logits[i : i + 1].numpy() - ref[f"logits{i}"]).max())
        mask = pred.transforms.postprocess(maps[i], im.shape[:2])
        score = iou(mask, ref[f"mask{i}"])
        record_property(f"image{i}_max_abs_logit_diff", diff)
        record_property(f"image{i}_iou", score)
        logger.info("image %d %s: max |Δlogit| %.2e, IoU %.5f", i, im.shape[:2], diff, score)
        assert diff < 1e-4, f"image {i}: logits differ by {diff}"
        assert mask.shape == ref[f"mask{i}"].shape and mask.dtype == np.uint8
        assert 0.02 < np.mean(ref[f"mask{i}"] > 0) < 0.98  # a mask with something to compare
        assert score >= 0.99, f"image {i} {im.shape[:2]}: IoU {score}"
