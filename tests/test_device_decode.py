"""``--decode gpu``: JPEGs shipped undecoded by the CPU stage, decoded and resized in the model actor.

Without a GPU the actor's decoder runs on the CPU (the fallback this machine can test); the CUDA
test at the end runs where a GPU is present.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from tests.test_cpu_stages import TRANSFORMS, _batch, _files
from vbatch.jobs.demo_data import encode, product_image
from vbatch.models.matting.transforms import MattingTransforms
from vbatch.operators.columns import decode_array
from vbatch.operators.decode import DecodeError, probe_jpeg
from vbatch.operators.device_decode import DeviceDecoder, is_encoded, orient
from vbatch.operators.images import INPUT, decode_and_preprocess
from vbatch.operators.manifest import ERROR

ALL_TRANSFORMS = {**TRANSFORMS, "matting": MattingTransforms(max_side=512)}


def _cmyk_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(product_image(5, (300, 200))).convert("CMYK").save(buf, "JPEG")
    return buf.getvalue()


def _inputs(table) -> list[np.ndarray | None]:
    return [None if v is None else decode_array(v) for v in table.column(INPUT).to_pylist()]


def test_cpu_stage_ships_rgb_and_grey_jpegs_undecoded() -> None:
    files = {**_files(), "cmyk-jpeg": _cmyk_jpeg()}
    transforms = TRANSFORMS["salient"]
    exact = decode_and_preprocess(_batch(list(files.values())), transforms=transforms)
    gpu = decode_and_preprocess(_batch(list(files.values())), transforms=transforms, decode="gpu")
    assert gpu.column(ERROR).to_pylist() == [None] * len(files)
    for col in ("width", "height"):  # from the header, orientation applied
        assert gpu.column(col).to_pylist() == exact.column(col).to_pylist()
    for (name, blob), a, b in zip(files.items(), _inputs(exact), _inputs(gpu), strict=True):
        assert a is not None and b is not None
        if name in ("jpeg", "grey-jpeg", "rotated-jpeg", "small-jpeg"):
            assert is_encoded(b) and b.tobytes() == blob, name
        else:  # PNG, CMYK: decoded here, exactly as in exact mode
            assert not is_encoded(b), name
            np.testing.assert_array_equal(a, b, err_msg=name)


def test_probe_reads_the_header_only_and_keeps_the_cap() -> None:
    photo = encode(product_image(1, (400, 300)), "JPEG")
    assert probe_jpeg(photo) == (300, 400)
    assert probe_jpeg(encode(product_image(1, (40, 30)), "PNG")) is None
    assert probe_jpeg(b"not an image at all") is None
    with pytest.raises(DecodeError, match="exceeds the cap of 1,000"):
        probe_jpeg(photo, max_pixels=1000)
    with pytest.raises(DecodeError, match="empty file"):
        probe_jpeg(b"")


@pytest.mark.parametrize("task", sorted(ALL_TRANSFORMS))
def test_actor_decode_on_cpu_matches_exact_mode(task: str) -> None:
    """torchvision's CPU decode is Pillow's libjpeg-turbo decode; torch's antialiased uint8 resize
    is within one grey level of Pillow's (matting's reference resize is OpenCV's area: a few)."""
    transforms = ALL_TRANSFORMS[task]
    files = _files()
    exact = _inputs(decode_and_preprocess(_batch(list(files.values())), transforms=transforms))
    gpu = _inputs(
        decode_and_preprocess(_batch(list(files.values())), transforms=transforms, decode="gpu")
    )
    jpegs = [k for k, a in enumerate(gpu) if a is not None and is_encoded(a)]
    assert len(jpegs) == 4
    decoded = DeviceDecoder(transforms, torch.device("cpu"))([gpu[k] for k in jpegs])
    for k, got in zip(jpegs, decoded, strict=True):
        want = exact[k]
        assert isinstance(got, np.ndarray) and want is not None
        assert got.shape == want.shape and got.dtype == want.dtype
        diff = np.abs(got.astype(int) - want.astype(int))
        limit, mean = (4, 0.5) if task == "matting" else (1, 0.01)
        assert diff.max() <= limit and diff.mean() < mean, (task, k, diff.max(), diff.mean())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_as_pillow_shows_it(orientation: int) -> None:
    pil = Image.fromarray(product_image(2, (60, 36)))
    exif = pil.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    pil.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    blob = buf.getvalue()
    shown = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(blob))).convert("RGB"))
    # the decoder's own orientation step (used on every device), at full size
    transforms = MattingTransforms(max_side=4096)
    (got,) = DeviceDecoder(transforms, torch.device("cpu"))([np.frombuffer(blob, np.uint8)])
    np.testing.assert_array_equal(got, shown)
    assert probe_jpeg(blob) == shown.shape[:2]
    raw = torch.arange(6).reshape(1, 2, 3)  # and the pure tensor operation, on a tiny array
    expected = np.asarray(ImageOps.exif_transpose(_tagged(raw[0].numpy(), orientation)))
    np.testing.assert_array_equal(orient(raw, orientation)[0].numpy(), expected)


def _tagged(values: np.ndarray, orientation: int) -> Image.Image:
    img = Image.fromarray(values.astype(np.uint8))
    img.getexif()[0x0112] = orientation
    return img


def test_bad_bodies_become_row_errors_and_the_rest_decodes() -> None:
    """A JPEG whose header is fine but whose body is cut: the batched call fails, every other file
    still decodes (as it would alone), and the cut one gets exact mode's message."""
    transforms = TRANSFORMS["salient"]
    good = [encode(product_image(s, (200, 150)), "JPEG") for s in range(3)]
    cut = good[1][: len(good[1]) // 2]
    assert probe_jpeg(cut) == (150, 200)  # the CPU stage cannot tell
    decoder = DeviceDecoder(transforms, torch.device("cpu"))
    files = [np.frombuffer(b, np.uint8) for b in (good[0], cut, good[2])]
    got = decoder(files)
    assert isinstance(got[1], str) and got[1].startswith("corrupt or truncated image")
    exact = decode_and_preprocess(_batch([cut]), transforms=transforms)
    assert exact.column(ERROR)[0].as_py() == got[1]
    for k in (0, 2):
        (alone,) = decoder([files[k]])
        np.testing.assert_array_equal(got[k], alone)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_decode_is_close_to_the_cpu_fallback() -> None:
    transforms = TRANSFORMS["salient"]
    blobs = [encode(product_image(s, (1600, 1200)), "JPEG", quality=90) for s in range(4)]
    files = [np.frombuffer(b, np.uint8) for b in blobs]
    cpu = DeviceDecoder(transforms, torch.device("cpu"))(files)
    gpu = DeviceDecoder(transforms, torch.device("cuda"))(files)
    for a, b in zip(cpu, gpu, strict=True):
        assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
        diff = np.abs(a.astype(int) - b.astype(int))
        assert diff.mean() < 1.0, diff.mean()


def test_fuzzed_jpegs_through_the_gpu_path_become_rows_or_row_errors() -> None:
    """Mutated JPEGs (the decode fuzz's mutations) through ``--decode gpu``'s CPU stage and the
    actor's decoder in batches: every file becomes a network input or its row's error, nothing
    raises, and a file counts as decoded exactly when exact mode decodes it too."""
    import random

    from tests.test_decode_fuzz import _mutate

    rng = random.Random(20261130)
    valid = [encode(product_image(s, (40 + s, 30 + 2 * s)), "JPEG", quality=80) for s in range(6)]
    blobs = [_mutate(valid[k % len(valid)], rng) for k in range(300)]
    transforms = TRANSFORMS["salient"]
    decoder = DeviceDecoder(transforms, torch.device("cpu"))
    agree = disagree = decoded = 0
    for start in range(0, len(blobs), 8):
        chunk = blobs[start : start + 8]
        exact = decode_and_preprocess(_batch(chunk), transforms=transforms)
        gpu = decode_and_preprocess(_batch(chunk), transforms=transforms, decode="gpu")
        inputs = _inputs(gpu)
        files = [k for k, a in enumerate(inputs) if a is not None and is_encoded(a)]
        results = decoder([inputs[k] for k in files]) if files else []
        outcome = {k: isinstance(r, np.ndarray) for k, r in zip(files, results, strict=True)}
        for k, (e_err, g_err) in enumerate(
            zip(exact.column(ERROR).to_pylist(), gpu.column(ERROR).to_pylist(), strict=True)
        ):
            gpu_ok = outcome.get(k, g_err is None)
            decoded += gpu_ok
            if (e_err is None) == gpu_ok:
                agree += 1
            else:
                disagree += 1
    assert agree + disagree == len(blobs)
    assert disagree == 0, f"{disagree} of {len(blobs)} files decoded in one mode only"
    assert 0 < decoded < len(blobs), decoded  # the mutations make both outcomes
    print(f"{decoded} of {len(blobs)} fuzzed JPEGs decoded, the rest row errors")
