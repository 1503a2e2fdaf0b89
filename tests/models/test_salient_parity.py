"""Parity of the salient models with ModelScope 1.40.2 (random weights, full size, both variants).

``tests/oracle/salient_ref.py`` builds ModelScope's SENet (with a ``config.py`` that has non-default
mean/std and a non-square size) and U2NET with every parameter and buffer randomised, saves them in
ModelScope's layout and records (a) the network's first map on preprocessed inputs and (b) the
pipeline's masks end to end on photo-like images of several sizes. Here the same directories are
loaded with our code, strictly, and compared.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.oracle.runner import run_oracle
from vbatch.models.checkpoint import read_state_dict
from vbatch.models.registry import load_model
from vbatch.models.salient.convert import senet_to_modelscope
from vbatch.models.salient.model import SENet

logger = logging.getLogger(__name__)

pytestmark = [pytest.mark.parity, pytest.mark.slow]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    out = tmp_path_factory.mktemp("salient_ref")
    run_oracle("salient_ref.py", out)
    with np.load(out / "salient_ref.npz") as z:
        return out, {k: z[k] for k in z.files}


def test_random_dir_writer_uses_modelscope_keys(
    reference: tuple[Path, dict[str, np.ndarray]],
) -> None:
    """What ``write_random_model_dir`` writes has exactly the reference checkpoint's names and shapes."""
    out, _ = reference
    ref = read_state_dict(out / "senet" / "pytorch_model.pt")
    net = SENet()
    ours = senet_to_modelscope(net.state_dict(), net)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {
        k: tuple(v.shape) for k, v in ref.items()
    }


@pytest.mark.parametrize("variant", ["senet", "u2net"])
def test_parity_with_modelscope(
    variant: str,
    reference: tuple[Path, dict[str, np.ndarray]],
    record_property: pytest.RecordProperty,
) -> None:
    out, ref = reference
    pred = load_model("salient", out / variant, device="cpu")
    assert pred.variant == variant

    images = [ref[f"image{i}"] for i in range(sum(k.startswith("image") for k in ref))]
    pre_ref = ref[f"{variant}_pre_uint8"]

    # preprocessing: identical bytes to torchvision's Resize on a PIL image
    pre = [pred.transforms.preprocess(im) for im in images]
    for a, b in zip(pre, pre_ref, strict=True):
        np.testing.assert_array_equal(a, b)

    # (a) the network on the same preprocessed tensor
    with torch.inference_mode():
        net_only = pred.net(torch.from_numpy(ref[f"{variant}_pre_float"]))[:, 0].numpy()
    err_net = float(np.abs(net_only - ref[f"{variant}_net"]).max())
    maps = np.stack(pred.forward(list(pre_ref)))  # uint8 in, normalised on the device
    err_fwd = float(np.abs(maps - ref[f"{variant}_net"]).max())

    # (b) end to end: masks at the original sizes
    masks = pred.predict(images)
    mean_errs, max_errs = [], []
    for i, m in enumerate(masks):
        r = ref[f"{variant}_mask{i}"]
        assert m.shape == r.shape and m.dtype == np.uint8
        d = np.abs(m.astype(np.int16) - r.astype(np.int16))
        mean_errs.append(float(d.mean()))
        max_errs.append(int(d.max()))

    summary = (
        f"salient {variant}: network max|Δ| {err_net:.2e} (float input), {err_fwd:.2e} (uint8 input); "
        f"masks mean|Δ| {max(mean_errs):.2e} grey levels (worst image), max|Δ| {max(max_errs)}"
    )
    logger.info(summary)
    record_property("parity", summary)
    print(summary)  # shown with -s / in the report
    assert err_net <= 1e-4, summary
    assert err_fwd <= 1e-4, summary
    assert max(mean_errs) <= 1.0, summary
