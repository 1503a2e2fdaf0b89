"""rvos parity with ModelScope 1.40.2's MTTR (random weights), via tests/oracle/rvos_ref.py.

* full: the FULL architecture on one 24-frame window at 360x640 (network outputs, then the window's
  masks), once; the reference forward alone takes ~30 s on 2 CPU cores.
* pipeline: the real Swin-T with a small transformer and RoBERTa (the reference accepts them from
  its configuration), the whole pipeline on a 20-frame video with two queries: two windows, one of
  them 2 frames long, and a thin frame shape so that Swin's windows shrink in time and height.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.oracle.runner import run_oracle
from vbatch import models
from vbatch.models.rvos.text import normalize_query, tokenize
from vbatch.models.rvos.transforms import frame_masks, preprocess_frames, select_trajectory

pytestmark = [pytest.mark.parity, pytest.mark.slow]


@pytest.fixture(scope="module")
def oracle(tmp_path_factory) -> Path:
    """Both reference cases, from one oracle process (its start-up is paid once)."""
    out = tmp_path_factory.mktemp("rvos")
    run_oracle("rvos_ref.py", out, "full,pipeline")
    return out


def _oracle(oracle: Path, mode: str):
    return oracle / mode / "model", dict(np.load(oracle / mode / "ref.npz"))


def test_full_window_parity(oracle):
    model_dir, ref = _oracle(oracle, "full")
    predictor = models.load_model("rvos", model_dir, device="cpu")
    query = str(ref["query"])
    assert normalize_query(query) == str(ref["normalized_query"])

    # preprocessing: the same torchvision resize and normalisation
    clip = preprocess_frames(ref["frames"])
    assert clip.shape == (24, 3, 360, 640)
    np.testing.assert_allclose(clip.numpy(), ref["clip"], rtol=0, atol=1e-6)

    # tokenizer (saved by transformers 4.x' reference, read by ours)
    ids, _ = tokenize(predictor.tokenizer, [normalize_query(query)])
    np.testing.assert_array_equal(ids.numpy(), ref["input_ids"])

    # the network on the reference's own input tensor
    out = predictor.run_network(torch.from_numpy(ref["clip"]), [query])
    for key in ("pred_masks", "pred_is_referred"):
        ours, theirs = out[key].numpy(), ref[key]
        assert ours.shape == theirs.shape, key
        err = np.abs(ours - theirs)
        print(
            f"rvos full {key}: max abs diff {err.max():.2e}, mean {err.mean():.2e}, ref scale {np.abs(theirs).max():.2e}"
        )
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)

    # the window's final masks (slot choice, bilinear upsampling, threshold, nearest resize to the
    # original size), from the outputs above: predict_window is the same steps on preprocess_frames'
    # output, which equals the reference's input (checked above) and is run end to end in
    # test_pipeline_parity. A pixel whose logit is within float noise of 0 may flip; no other may.
    logits, slots = select_trajectory(out["pred_is_referred"], out["pred_masks"])
    ref_slot = select_trajectory(
        torch.from_numpy(ref["pred_is_referred"]), torch.from_numpy(ref["pred_masks"])
    )[1]
    assert slots.tolist() == ref_slot.tolist()
    size = ref["frames"].shape[1:3]
    masks = frame_masks(logits, (360, 640), size)[0].numpy()
    theirs = ref["window_masks"].astype(np.uint8) * 255
    flipped = masks != theirs
    at_flips = F.interpolate(
        F.interpolate(logits, size=(360, 640), mode="bilinear"), size=size, mode="nearest"
    )[0].numpy()[flipped]
    print(
        f"rvos full window masks: {int(flipped.sum())} of {masks.size} pixels differ "
        f"(|logit| there <= {np.abs(at_flips).max(initial=0):.1e}), "
        f"{theirs.mean() / 255:.3f} foreground"
    )
    assert flipped.mean() < 1e-5
    assert (np.abs(at_flips) < 1e-4).all()


def test_pipeline_parity(oracle):
    model_dir, ref = _oracle(oracle, "pipeline")
    predictor = models.load_model("rvos", model_dir, device="cpu")
    masks = predictor.predict_video(ref["frames"], [str(q) for q in ref["queries"]])
    theirs = (ref["masks"] * 255).astype(np.uint8)
    assert masks.shape == theirs.shape == (2, 20, 26, 338)
    assert 0.02 < theirs.mean() / 255 < 0.98  # masks that can tell a wrong port from a right one
    np.testing.assert_array_equal(masks, theirs)
