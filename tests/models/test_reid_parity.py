"""Parity of the PASS re-ID model with ModelScope's pipeline, random weights, at full size.

``tests/oracle/reid_ref.py`` (oracle environment) builds ModelScope's ``PASS`` for several
configurations, saves each in ModelScope's layout and records the pipeline's preprocessed tensors and
embeddings for three person-crop-like images of different sizes. Here the same directories are loaded
with our strict loader and compared three ways: preprocessing alone, the network on the reference's
preprocessed tensor, and end to end from the RGB images. The oracle also runs a model directory
written by :func:`vbatch.models.reid.modeldir.write_random_model_dir`, proving it is a valid ModelScope directory.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.oracle.runner import run_oracle
from vbatch.models.reid import ReidConfig, load
from vbatch.models.reid.modeldir import write_random_model_dir

pytestmark = [pytest.mark.parity, pytest.mark.slow]

logger = logging.getLogger(__name__)

# (case directory, expected embedding length); see CASES in tests/oracle/reid_ref.py
CASES = [
    ("full_cat_before", 1536),  # the released configuration
    ("full_cat_after", 1536),
    ("full_mean_after", 768),
    ("small_single_mean_after", 768),  # 64x32, overlapping 10x8 strides, one BN neck
]
# a ViT-B (the reference hard-codes it) at a smaller input with overlapping strides
WRITTEN = ReidConfig(
    image_size=(128, 64), stride=(12, 12), pixel_mean=(0.4, 0.5, 0.6), pixel_std=(0.2, 0.25, 0.3)
)

ATOL = 1e-4
MIN_COS = 0.99999


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reid_parity")
    written = write_random_model_dir(root / "written", WRITTEN, seed=1)
    run_oracle("reid_ref.py", root / "ref", "--check-dir", written)
    return root


def _compare(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    diff = float(np.abs(ours - ref).max())
    ours, ref = ours.astype(np.float64), ref.astype(np.float64)
    cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    logger.info(
        "%s: max abs diff %.2e (max |ref| %.2f), min cosine %.8f",
        what,
        diff,
        np.abs(ref).max(),
        cos.min(),
    )
    assert diff <= ATOL, f"{what}: max abs diff {diff:.3e} > {ATOL}"
    assert cos.min() >= MIN_COS, f"{what}: cosine {cos.min():.8f} < {MIN_COS}"


def _images(ref: np.lib.npyio.NpzFile) -> list[np.ndarray]:
    return [
        ref[k]
        for k in sorted((k for k in ref.files if k.startswith("image_")), key=lambda k: int(k[6:]))
    ]


def _check_dir(model_dir: Path, ref_file: Path, embed_dim: int, name: str) -> None:
    ref = np.load(ref_file)
    images = _images(ref)
    assert len({im.shape for im in images}) == len(images) == 3
    pred = load(model_dir, device="cpu")
    assert ref["pipeline"].shape == (3, embed_dim) == (3, pred.embed_dim)
    # 1. preprocessing: PIL bilinear resize to (h, w), then ToTensor + Normalize
    inputs = [pred.transforms.preprocess(im) for im in images]
    x = torch.from_numpy(np.stack(inputs)).permute(0, 3, 1, 2)
    normalised = pred.net.normalize(x).numpy()
    prep = float(np.abs(normalised - ref["input"]).max())
    logger.info("%s preprocessing: max abs diff %.2e", name, prep)
    assert prep <= 1e-6
    # 2. the network on the reference's own preprocessed tensor
    with torch.inference_mode():
        on_ref_input = pred.net.embed(torch.from_numpy(ref["input"])).numpy()
    _compare(on_ref_input, ref["pipeline"], f"{name} network")
    # 3. end to end from RGB images
    _compare(np.stack(pred.predict(images)), ref["pipeline"], f"{name} end to end")


@pytest.mark.parametrize(("case", "embed_dim"), CASES)
def test_parity_with_modelscope(oracle: Path, case: str, embed_dim: int) -> None:
    d = oracle / "ref" / case
    _check_dir(d, d / "ref.npz", embed_dim, case)


def test_written_model_dir_runs_in_modelscope(oracle: Path) -> None:
    """The reference pipeline loads our random directory with every weight copied (checked by the
    oracle) and returns our embeddings."""
    _check_dir(
        oracle / "written", oracle / "ref" / "check" / "ref.npz", WRITTEN.embed_dim, "written"
    )


def test_batch_independence_full_size(oracle: Path) -> None:
    d = oracle / "ref" / "full_cat_before"
    pred = load(d, device="cpu")
    images = _images(np.load(d / "ref.npz"))
    inputs = [pred.transforms.preprocess(im) for im in [*images, images[0][::-1].copy()]]
    batched = np.stack(pred.forward(inputs))
    single = np.stack([pred.forward([x])[0] for x in inputs])
    _compare(batched, single, "batch of 4 vs 4 batches of 1")
    assert np.abs(batched - single).max() <= 1e-5
