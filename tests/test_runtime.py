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
    with pytest.raises(ValueError, match="contradict"):
        decide_resources("salient", gpus_per_actor=1, device="cpu")
    with pytest.raises(ValueError, match="choose one of auto, cpu, cuda"):
        decide_resources("salient", device="gpu")


def test_cuda_is_requested_even_when_no_gpu_is_up(ray_session, monkeypatch) -> None:
    """What a nightly run on an autoscaling cluster sees at submit time: no GPU node yet."""
    import vbatch.jobs.runtime as rt

    monkeypatch.setattr(rt, "autoscaler_max_gpus", lambda: None)
    res = decide_resources("salient", device="cuda")
    assert (res.device, res.gpus_per_actor, res.pool_size()) == ("cuda", 1.0, (1, 1))
    assert res.batch_size == 32  # the GPU default, not the CPU one
    # an explicit --gpus-per-actor is no longer refused either
    assert decide_resources("salient", gpus_per_actor=1).device == "cuda"
    # auto without GPUs and without an autoscaler that could add them: the CPU
    assert decide_resources("salient").device == "cpu"


def test_auto_follows_the_autoscaler_and_the_pool_grows(ray_session, monkeypatch) -> None:
    import vbatch.jobs.runtime as rt

    monkeypatch.setattr(rt, "autoscaler_max_gpus", lambda: 8)  # e.g. 8 g5.2xlarge at most
    monkeypatch.setattr(rt, "cluster_gpus", lambda: 0)
    res = decide_resources("salient")
    assert res.device == "cuda" and res.pool_size() == (1, 8)
    monkeypatch.setattr(rt, "cluster_gpus", lambda: 2)
    monkeypatch.setattr(rt, "probe_gpu_memory", lambda: None)
    assert decide_resources("salient").pool_size() == (2, 8)
    assert decide_resources("salient", gpus_per_actor=2).pool_size() == (1, 4)
    assert decide_resources("salient", actors=3).pool_size() == (3, 3)
    assert decide_resources("salient", device="cpu").pool_size() == (1, 1)


def test_threads_come_from_the_nodes_not_the_driver(ray_session, monkeypatch) -> None:
    import vbatch.jobs.runtime as rt

    monkeypatch.setattr(rt, "node_cpus", lambda: 16)
    assert decide_resources("salient").threads == 16
    assert decide_resources("salient", actors=2).threads == 8  # one node: the cores are shared
