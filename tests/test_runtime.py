"""Hardware-dependent defaults decided in jobs/runtime.py."""

from __future__ import annotations

import pytest

from vbatch.jobs.runtime import decide_resources, shop_seg_gpu_batch
from vbatch.models.shop_seg import FULL, activation_bytes_per_image


def test_shop_seg_gpu_batch_follows_free_memory_and_precision() -> None:
    gib = 2**30
    small, large = shop_seg_gpu_batch(10 * gib, "fp32"), shop_seg_gpu_batch(22 * gib, "fp32")
    assert 1 <= small < large
    assert (
        shop_seg_gpu_batch(22 * gib, "bf16") > large
    )  # half the activations, about twice the batch
    # what it picks fits in 60 % of what is left after the weights
    assert large * activation_bytes_per_image(FULL, "fp32") <= 0.6 * (22 * gib - 0.68 * gib)
    assert shop_seg_gpu_batch(1 * gib, "fp32") == 1  # never zero
    assert shop_seg_gpu_batch(500 * gib, "bf16") == 64  # capped


def test_cpu_defaults_and_refusals(ray_session) -> None:
    res = decide_resources("salient")
    assert (res.device, res.gpus_per_actor, res.actors, res.batch_size) == ("cpu", 0.0, 1, 8)
    assert decide_resources("shop-seg", precision="bf16").batch_size == 2
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        decide_resources("shop-seg", precision="fp16")
    with pytest.raises(ValueError, match="has no GPU"):
        decide_resources("salient", gpus_per_actor=1)
