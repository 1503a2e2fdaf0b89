"""The cheaper CPU stages: exact mode unchanged, ``decode="fast"`` close, ``mask_size="model"`` exact
when upsampled as documented. No Ray: the stage functions run on pyarrow tables directly."""

from __future__ import annotations

import importlib
import io
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from vbatch.jobs.cli import build_parser
from vbatch.jobs.cli.segment import image_job_config
from vbatch.jobs.demo_data import encode, person_crop, product_image
from vbatch.models.reid.transforms import ReidTransforms
from vbatch.models.salient.transforms import SalientTransforms
from vbatch.models.shop_seg.transforms import ShopSegTransforms
from vbatch.operators.columns import decode_array, encode_array
from vbatch.operators.decode import decode_image, open_image
from vbatch.operators.images import BYTES, INPUT, OUTPUT, decode_and_preprocess
from vbatch.operators.manifest import ERROR
from vbatch.operators.outputs import OutputOptions, encode_png, write_products
from vbatch.operators.storage import Storage, StorageOptions


def _rotated_jpeg(image: np.ndarray) -> bytes:
    pil = Image.fromarray(image)
    exif = pil.getexif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    buf = io.BytesIO()
    pil.save(buf, "JPEG", exif=exif.tobytes(), quality=92)
    return buf.getvalue()


def _files() -> dict[str, bytes]:
    photo = product_image(3, (1000, 700))
    grey = np.asarray(Image.fromarray(photo).convert("L"))
    return {
        "jpeg": encode(photo, "JPEG", quality=90),
        "png": encode(photo, "PNG"),
        "grey-jpeg": encode(grey, "JPEG"),
        "rgba-png": encode(np.dstack([photo, np.full(photo.shape[:2], 200, np.uint8)]), "PNG"),
        "rotated-jpeg": _rotated_jpeg(photo),
        "small-jpeg": encode(product_image(4, (200, 150)), "JPEG"),
    }


def _batch(blobs: list[bytes]) -> pa.Table:
    n = len(blobs)
    return pa.table(
        {
            "image_id": pa.array([f"i{k}" for k in range(n)]),
            "uri": pa.array([f"i{k}.jpg" for k in range(n)]),
            "model_version": pa.array(["v"] * n),
            ERROR: pa.array([None] * n, pa.string()),
            BYTES: pa.array(blobs, pa.large_binary()),
        }
    )


TRANSFORMS = {
    "salient": SalientTransforms((320, 320)),
    "shop-seg": ShopSegTransforms(256),
    "reid": ReidTransforms((256, 128), 8),
}


@pytest.mark.parametrize("task", sorted(TRANSFORMS))
def test_exact_mode_gives_the_reference_inputs(task: str) -> None:
    """Decoding straight into Pillow's resize changes no value: same as array decode + preprocess."""
    transforms = TRANSFORMS[task]
    files = _files()
    out = decode_and_preprocess(_batch(list(files.values())), transforms=transforms)
    assert out.column(ERROR).to_pylist() == [None] * len(files)
    for k, (name, blob) in enumerate(files.items()):
        reference = decode_image(blob)
        got = decode_array(out.column(INPUT)[k].as_py())
        np.testing.assert_array_equal(got, transforms.preprocess(reference), err_msg=name)
        size = (out.column("height")[k].as_py(), out.column("width")[k].as_py())
        assert size == reference.shape[:2], name


def test_fast_decode_scales_jpegs_only() -> None:
    """draft() decodes a JPEG at the smallest DCT scale still covering the request; PNG at full size."""
    files = _files()
    jpeg = open_image(files["jpeg"], min_size=(160, 160))
    assert jpeg.size == (700, 1000)
    assert jpeg.array().shape[:2] == (175, 250)  # 1/4: 1/8 would be 88 px high, below 160
    png = open_image(files["png"], min_size=(160, 160))
    np.testing.assert_array_equal(png.array(), decode_image(files["png"]))
    rotated = open_image(files["rotated-jpeg"], min_size=(320, 200))
    assert rotated.size == (1000, 700)
    h, w = rotated.array().shape[:2]
    assert (h, w) == (500, 350)  # 1/2 in the shown orientation, ≥ (320, 200)


@pytest.mark.parametrize("task", sorted(TRANSFORMS))
def test_fast_mode_is_close_and_falls_back_for_other_formats(task: str) -> None:
    transforms = TRANSFORMS[task]
    files = _files()
    blobs = list(files.values())
    exact = decode_and_preprocess(_batch(blobs), transforms=transforms)
    fast = decode_and_preprocess(_batch(blobs), transforms=transforms, decode="fast")
    assert fast.column(ERROR).to_pylist() == [None] * len(files)
    for col in ("width", "height"):  # the original's size, not the reduced decode's
        assert fast.column(col).to_pylist() == exact.column(col).to_pylist()
    for k, name in enumerate(files):
        a = decode_array(exact.column(INPUT)[k].as_py()).astype(np.float64)
        b = decode_array(fast.column(INPUT)[k].as_py()).astype(np.float64)
        assert a.shape == b.shape, name
        if name.endswith("png"):  # not a JPEG: decoded at full size, exactly as in exact mode
            np.testing.assert_array_equal(a, b, err_msg=name)
        else:
            assert np.abs(a - b).mean() < 3.0, name
    assert not np.array_equal(
        decode_array(exact.column(INPUT)[0].as_py()), decode_array(fast.column(INPUT)[0].as_py())
    ), "fast mode did not change the decode path"


def test_fast_mode_salient_mask_within_two_grey_levels() -> None:
    """End to end with a smooth stand-in network (a blur of the input's darkness): the final masks of
    the two modes differ by < 2 grey levels on average."""
    transforms = TRANSFORMS["salient"]
    blobs = [encode(product_image(s, (1600, 1200)), "JPEG", quality=90) for s in range(3)]
    masks = {}
    for mode in ("exact", "fast"):
        out = decode_and_preprocess(_batch(blobs), transforms=transforms, decode=mode)
        masks[mode] = []
        for k in range(len(blobs)):
            x = decode_array(out.column(INPUT)[k].as_py()).astype(np.float32)
            saliency = cv2.GaussianBlur(255.0 - x.mean(axis=2), (0, 0), 4)
            masks[mode].append(transforms.postprocess(saliency, (1200, 1600)).astype(np.float64))
    diff = np.abs(np.stack(masks["exact"]) - np.stack(masks["fast"]))
    assert diff.mean() < 2.0


def test_decode_mode_is_checked() -> None:
    with pytest.raises(ValueError, match="decode must be one of"):
        decode_and_preprocess(_batch([b""]), transforms=TRANSFORMS["salient"], decode="quick")


def _write(tmp_path, task: str, mask_size: str, blobs: list[bytes]) -> tuple[pa.Table, list]:
    transforms = TRANSFORMS[task]
    batch = decode_and_preprocess(_batch(blobs), transforms=transforms)
    rng = np.random.default_rng(0)
    outputs = []
    for k in range(batch.num_rows):
        x = decode_array(batch.column(INPUT)[k].as_py())
        if task == "salient":
            out = cv2.GaussianBlur(x.mean(axis=2).astype(np.float32), (0, 0), 3)
        else:
            out = (rng.random(x.shape[:2]) > 0.5).astype(np.uint8)
        outputs.append(out)
    batch = batch.drop_columns([INPUT]).append_column(
        OUTPUT, pa.array([encode_array(o) for o in outputs], pa.large_binary())
    )
    options = OutputOptions(out_uri=str(tmp_path / mask_size), task=task, output="mask")
    options = OutputOptions(**{**options.__dict__, "mask_size": mask_size})
    storage = Storage(StorageOptions())
    return write_products(batch, transforms=transforms, options=options, storage=storage), outputs


@pytest.mark.parametrize("task", ["salient", "shop-seg"])
def test_model_size_masks_upsample_to_the_full_masks(tmp_path, task: str) -> None:
    blobs = [
        encode(product_image(s, size), "JPEG") for s, size in enumerate([(640, 480), (333, 500)])
    ]
    full, _ = _write(tmp_path, task, "full", blobs)
    small, _ = _write(tmp_path, task, "model", blobs)
    assert small.column("status").to_pylist() == ["ok", "ok"]
    for k in range(2):
        h, w = small.column("height")[k].as_py(), small.column("width")[k].as_py()
        assert (h, w) == (full.column("height")[k].as_py(), full.column("width")[k].as_py())
        big = cv2.imread(full.column("mask_uri")[k].as_py(), cv2.IMREAD_UNCHANGED)
        mask = cv2.imread(small.column("mask_uri")[k].as_py(), cv2.IMREAD_UNCHANGED)
        assert big.shape == (h, w)
        if task == "salient":
            assert mask.shape == (320, 320)
            up = cv2.resize(mask, (w, h), interpolation=cv2.INTER_LINEAR)
        else:
            s = TRANSFORMS[task].image_size
            assert max(mask.shape) == s and mask.shape[0] / mask.shape[1] == pytest.approx(
                h / w, rel=0.01
            )
            up = np.asarray(Image.fromarray(mask).resize((w, h), Image.Resampling.BILINEAR))
            up = np.where(up >= 128, 255, 0).astype(np.uint8)
        np.testing.assert_array_equal(up, big)  # the documented upsampling gives the full mask


def test_mask_size_model_refused_for_embeddings(tmp_path) -> None:
    blobs = [encode(person_crop(0, 0), "JPEG")]
    batch = decode_and_preprocess(_batch(blobs), transforms=TRANSFORMS["reid"])
    batch = batch.drop_columns([INPUT]).append_column(
        OUTPUT, pa.array([encode_array(np.ones(8, np.float32))], pa.large_binary())
    )
    options = OutputOptions(
        out_uri=str(tmp_path), task="reid", output="embedding", embedding_dim=8, mask_size="huge"
    )
    with pytest.raises(ValueError, match="mask_size must be one of"):
        write_products(
            batch, transforms=TRANSFORMS["reid"], options=options, storage=Storage(StorageOptions())
        )


def test_cli_options_reach_the_job_config() -> None:
    base = [
        "segment",
        "--task",
        "salient",
        "--manifest",
        "m.parquet",
        "--model-dir",
        "d",
        "--out",
        "o",
    ]
    args = build_parser().parse_args(base)
    cfg = image_job_config(args, "salient")
    assert (cfg.decode, cfg.mask_size) == ("exact", "full")
    args = build_parser().parse_args([*base, "--decode", "fast", "--mask-size", "model"])
    cfg = image_job_config(args, "salient")
    assert (cfg.decode, cfg.mask_size) == ("fast", "model")


def test_png_settings_are_lossless() -> None:
    rng = np.random.default_rng(1)
    grey = cv2.resize(rng.integers(0, 256, (40, 30), dtype=np.uint8), (333, 250))
    rgba = np.dstack([product_image(2, (333, 250)), grey])
    noise = rng.integers(0, 256, (97, 61), dtype=np.uint8)  # every UP difference wraps somewhere
    strips = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((1, 1), (1, 57), (43, 1))]
    view = grey[::2, 3:200]  # not contiguous
    binary = np.where(grey > 127, 255, 0).astype(np.uint8)
    for image in (grey, binary, noise, *strips, view, rgba):
        data = encode_png(image)
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # the whole zlib stream decoded (libpng below also checks every CRC)
            assert im.mode == ("RGBA" if image.ndim == 3 else "L")
            np.testing.assert_array_equal(np.asarray(im), image)
        if image.ndim == 2:
            back = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
            np.testing.assert_array_equal(back, image)  # libpng, the other common reader
    with pytest.raises(ValueError, match="8-bit grey or RGBA"):
        encode_png(np.zeros((4, 4), np.float32))


def test_image_cpu_stages_do_not_import_torch() -> None:
    """A CPU worker that fetches, decodes, preprocesses and writes (and unpickles each model's
    transforms) imports no torch nor timm: seconds and ~270 MB per Ray worker."""
    code = (
        "import pickle, sys\n"
        "import vbatch.operators.images, vbatch.operators.outputs\n"
        "from vbatch.models.salient import SalientTransforms\n"
        "from vbatch.models.shop_seg import ShopSegTransforms\n"
        "from vbatch.models.reid import ReidTransforms\n"
        "from vbatch.models.matting import MattingTransforms, alpha_of\n"
        "heavy = sorted(m for m in ('torch', 'timm', 'onnxruntime') if m in sys.modules)\n"
        "print(heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


OTHERS = ("shop_seg", "reid", "matting", "rvos")


def test_model_packages_resolve_their_names_on_first_use() -> None:
    import vbatch.models.salient as salient
    from vbatch.models.salient import SENET_TINY, SalientPredictor
    from vbatch.models.salient.config import SENET_TINY as direct
    from vbatch.models.salient.predictor import SalientPredictor as direct_predictor

    assert SENET_TINY is direct and SalientPredictor is direct_predictor
    for package in (salient, *(importlib.import_module(f"vbatch.models.{m}") for m in OTHERS)):
        for name in package.__all__:
            assert getattr(package, name) is not None, (package.__name__, name)
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        salient.nothing  # noqa: B018


@pytest.mark.parametrize("decode", ["exact", "gpu"])
def test_the_cpu_stage_benchmark_runs(decode: str) -> None:
    """bench_cpu_stages.py runs for every task it offers (a smoke run at 0.3 MP, one repeat): the
    benchmark behind docs/BENCHMARKS.md must not rot with the code it measures."""
    root = Path(__file__).resolve().parent.parent
    argv = [sys.executable, str(root / "bench" / "bench_cpu_stages.py"), "--decode", decode]
    argv += ["--sizes", "0.3", "--repeats", "1", "--batch", "1"]
    out = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=300).stdout
    rows = [line.split("|") for line in out.splitlines() if "|" in line][1:]
    tasks = ["salient", "shop-seg", "matting"]
    assert [r[0].strip() for r in rows] == (tasks if decode == "gpu" else [*tasks, "reid", "rvos"])
    for r in rows:
        total = float(r[8])  # the CPU stages' sum
        assert 0 < total < 10_000, r


@pytest.mark.parametrize("decode", ["fast", "gpu"])
def test_the_deviation_benchmark_runs(decode: str) -> None:
    """bench_cpu_stages.py --compare (the deviation figures of docs/BENCHMARKS.md) runs for every
    task, and reports a deviation where the mode changes the network input."""
    root = Path(__file__).resolve().parent.parent
    argv = [sys.executable, str(root / "bench" / "bench_cpu_stages.py"), "--decode", decode]
    argv += ["--compare", "1", "--sizes", "2", "--tasks", "salient", "shop-seg", "reid"]
    argv += ["matting"]
    out = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=300).stdout
    lines = {line.split()[0]: line for line in out.splitlines() if " MP: input" in line}
    assert sorted(lines) == ["matting", "reid", "salient", "shop-seg"]
    assert "mask |Δ| mean" in lines["salient"] and "IoU mean" in lines["shop-seg"]
    assert "cosine mean" in lines["reid"]
    mean = float(lines["salient"].split("input |Δ| mean ")[1].split()[0])
    if decode == "fast":  # the DCT-scaled decode moves the input by a fraction of a grey level
        assert 0 < mean < 3, lines["salient"]
    else:  # the actor's CPU decode is Pillow's; its resize within one grey level, rarely
        assert mean < 0.05, lines["salient"]
