"""Benchmark: CPU milliseconds per image of the pipeline's non-model stages, per task and image size.

Runs the project's own stage functions on one thread — fetch (local file), decode, preprocess
(including the ``.npy`` serialisation the operator does), postprocess, encode and write — with a
synthetic stand-in for the network's output at the network's output size (no network runs). CPU
time (``time.process_time``), not wall time, so that other load on a shared machine matters less;
each figure is the median of ``--repeats`` runs. The last column runs the real operator functions
(``fetch_bytes`` → ``decode_and_preprocess`` → ``write_products``) over a small batch, per image.

    OMP_NUM_THREADS=1 python bench/bench_cpu_stages.py --tasks salient shop-seg --sizes 2
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy/torch/cv2 start their pools

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import torch

from vbatch.jobs.demo_data import encode, person_crop, product_image
from vbatch.models.base import Transforms
from vbatch.operators.columns import decode_array, encode_array
from vbatch.operators.decode import decode_image
from vbatch.operators.images import decode_and_preprocess, fetch_bytes
from vbatch.operators.inference import OUTPUT
from vbatch.operators.manifest import ERROR
from vbatch.operators.outputs import OutputOptions, encode_jpeg, encode_png, write_products
from vbatch.operators.storage import Storage, StorageOptions

#: megapixels → (width, height) of the generated photos (4:3)
SIZES = {0.3: (640, 480), 2.0: (1600, 1200), 12.0: (4000, 3000)}
STAGES = ("fetch", "decode", "preprocess", "postprocess", "encode", "write")
TASKS = ("salient", "shop-seg", "matting", "reid", "rvos")


def _blob(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth (h, w) float32 map in [0, 1] with one bright object: a saliency-map stand-in."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = h * rng.uniform(0.4, 0.6), w * rng.uniform(0.4, 0.6)
    d = ((yy - cy) / (0.3 * h)) ** 2 + ((xx - cx) / (0.25 * w)) ** 2
    return (1.0 / (1.0 + np.exp(8.0 * (d - 1.0)))).astype(np.float32)


class Timer:
    """Accumulates CPU seconds per stage name."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    def run(self, stage: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        t0 = time.process_time()
        out = fn(*args, **kwargs)
        self.ms[stage] = self.ms.get(stage, 0.0) + (time.process_time() - t0) * 1e3
        return out


def build_transforms(task: str, mask_size: str = "full") -> Transforms | None:
    """The task's transforms from its released configuration (no model directory needed)."""
    if task == "salient":
        from vbatch.models.salient.config import DEFAULT_SIZE
        from vbatch.models.salient.transforms import SalientTransforms

        return SalientTransforms(DEFAULT_SIZE)
    if task == "shop-seg":
        from vbatch.models.shop_seg.transforms import ShopSegTransforms

        return ShopSegTransforms(1024)
    if task == "matting":
        from vbatch.models.matting.transforms import MattingTransforms

        return MattingTransforms(2000)
    if task == "reid":
        from vbatch.models.reid.model import FULL
        from vbatch.models.reid.transforms import ReidTransforms

        return ReidTransforms(FULL.image_size, FULL.embed_dim)
    return None  # rvos: per-frame functions of operators.video / models.rvos


def standin_output(task: str, net_input: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What the network would return for ``net_input``, at the network's output size."""
    if task == "salient":
        h, w = net_input.shape[:2]
        return _blob(h, w, rng)
    if task == "shop-seg":
        s = net_input.shape[0]
        return (_blob(s, s, rng) > 0.5).astype(np.uint8)
    if task == "matting":
        h, w = net_input.shape[:2]
        alpha = (_blob(h, w, rng) * 255).astype(np.uint8)
        return np.concatenate([net_input, alpha[..., None]], axis=-1)
    if task == "reid":
        return rng.standard_normal(768).astype(np.float32)
    raise ValueError(task)


def output_kind(task: str) -> str:
    return {"salient": "mask", "shop-seg": "mask", "matting": "rgba", "reid": "embedding"}[task]


def make_image(task: str, mp: float, seed: int = 0) -> bytes:
    w, h = SIZES[mp]
    if task == "reid":  # person crops: 1:2 portrait of the same pixel count
        cw = round((w * h / 2) ** 0.5)
        return encode(person_crop(seed, seed % 7, (cw, 2 * cw)), "JPEG", quality=90)
    return encode(product_image(seed, (w, h)), "JPEG", quality=90)


def one_image(
    task: str,
    path: Path,
    out_dir: Path,
    storage: Storage,
    transforms: Transforms | None,
    rng: np.random.Generator,
    decode_kw: dict[str, Any],
    output_options: OutputOptions | None,
) -> dict[str, float]:
    """All stages for one image; returns CPU ms per stage."""
    t = Timer()
    blob = t.run("fetch", storage.read_bytes, str(path))
    if task == "rvos":
        return _one_frame(t, blob, out_dir, storage, rng)
    assert transforms is not None and output_options is not None
    image = t.run("decode", decode_image, blob, **decode_kw)
    size = image.shape[:2]
    shipped = t.run("preprocess", lambda: encode_array(transforms.preprocess(image)))
    net_input = decode_array(shipped)
    raw = encode_array(standin_output(task, net_input, rng))  # the model actor's column

    def post() -> np.ndarray:
        output = decode_array(raw)
        if task == "matting" and output.shape[:2] != size:
            original = decode_image(blob)  # the write stage decodes the original again
            return transforms.postprocess(output, size, image=original)  # type: ignore[call-arg]
        return transforms.postprocess(output, size)

    product = t.run("postprocess", post)
    files = t.run("encode", _encode_products, task, product)
    for name, data in files.items():
        t.run("write", storage.write_bytes, str(out_dir / name), data)
    return t.ms


def _encode_products(task: str, product: np.ndarray) -> dict[str, bytes]:
    if task in ("salient", "shop-seg"):
        return {"mask.png": encode_png(product)}
    if task == "matting":
        from vbatch.models.matting.transforms import alpha_of, composite

        return {
            "matte.png": encode_png(alpha_of(product)),
            "cutout.png": encode_png(product),
            "composite.jpg": encode_jpeg(composite(product, "#ffffff")),
        }
    # reid: the embedding goes into the results table, nothing is written per image
    np.divide(product, np.linalg.norm(product))
    return {}


def _one_frame(
    t: Timer, blob: bytes, out_dir: Path, storage: Storage, rng: np.random.Generator
) -> dict[str, float]:
    """rvos, one frame: the video stages' per-frame work (frames come as JPEG stills here)."""
    from vbatch.models.rvos.postprocess import frame_masks
    from vbatch.models.rvos.transforms import resized_size
    from vbatch.operators.video import resize_frames

    frame = t.run("decode", decode_image, blob)
    size = frame.shape[:2]
    resized = t.run("preprocess", resize_frames, frame[None])
    h, w = resized.shape[1:3]
    logits = torch.from_numpy((_blob((h + 3) // 4, (w + 3) // 4, rng) * 8 - 4).astype(np.float32))[
        None, None
    ]
    mask = t.run("postprocess", lambda: frame_masks(logits, resized_size(size), size)[0, 0].numpy())
    png = t.run("encode", encode_png, mask)
    t.run("write", storage.write_bytes, str(out_dir / "frame.png"), png)
    return t.ms


def operators_per_image(
    task: str,
    paths: list[Path],
    out_dir: Path,
    storage: Storage,
    transforms: Transforms,
    rng: np.random.Generator,
    options: OutputOptions,
    decode_kw: dict[str, Any],
) -> float:
    """CPU ms per image of fetch_bytes → decode_and_preprocess → write_products (stand-in model)."""
    n = len(paths)
    batch = pa.table(
        {
            "image_id": pa.array([f"img{i}" for i in range(n)]),
            "uri": pa.array([str(p) for p in paths]),
            "model_version": pa.array(["bench"] * n),
            ERROR: pa.array([None] * n, pa.string()),
        }
    )
    keep = options.output == "rgba"
    t0 = time.process_time()
    batch = fetch_bytes(batch, storage=storage, base_uri=str(out_dir), io_threads=1)
    batch = decode_and_preprocess(batch, transforms=transforms, keep_bytes=keep, **decode_kw)
    t1 = time.process_time()
    inputs = [decode_array(b) for b in batch.column("_vb_input").to_pylist()]
    outputs = [encode_array(standin_output(task, x, rng)) for x in inputs]
    batch = batch.drop_columns(["_vb_input"]).append_column(
        OUTPUT, pa.array(outputs, pa.large_binary())
    )
    t2 = time.process_time()
    result = write_products(batch, transforms=transforms, options=options, storage=storage)
    t3 = time.process_time()
    bad = [e for e in result.column("error").to_pylist() if e]
    if bad:
        raise RuntimeError(f"operators failed: {bad[:3]}")
    return ((t1 - t0) + (t3 - t2)) * 1e3 / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--sizes", nargs="+", type=float, default=list(SIZES), choices=list(SIZES))
    p.add_argument("--repeats", type=int, default=5, help="runs per figure; the median is shown")
    p.add_argument("--batch", type=int, default=4, help="images per operator-total run")
    args = p.parse_args()

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    storage = Storage(StorageOptions())
    rng = np.random.default_rng(0)
    header = ["task", "MP", *STAGES, "sum", "operators"]
    print(f"CPU ms per image (median of {args.repeats}), one thread")
    print(" | ".join(f"{h:>11}" for h in header))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for task in args.tasks:
            transforms = build_transforms(task)
            options = (
                None
                if task == "rvos"
                else OutputOptions(
                    out_uri=str(root / "out"),
                    task=task,
                    output=output_kind(task),
                    background="#ffffff" if task == "matting" else None,
                    embedding_dim=768 if task == "reid" else None,
                )
            )
            for mp in args.sizes:
                paths = []
                for i in range(max(1, args.batch)):
                    path = root / f"{task}-{mp}-{i}.jpg"
                    path.write_bytes(make_image(task, mp, seed=i))
                    paths.append(path)
                runs = [
                    one_image(task, paths[0], root, storage, transforms, rng, {}, options)
                    for _ in range(args.repeats + 1)
                ][1:]  # the first run warms caches and lazy imports
                med = {s: statistics.median(r.get(s, 0.0) for r in runs) for s in STAGES}
                total = sum(med.values())
                ops = float("nan")
                if transforms is not None and options is not None:
                    ops = statistics.median(
                        operators_per_image(
                            task, paths, root, storage, transforms, rng, options, {}
                        )
                        for _ in range(max(1, args.repeats // 2))
                    )
                cells = [task, f"{mp:g}", *(f"{med[s]:.1f}" for s in STAGES), f"{total:.1f}"]
                cells.append(f"{ops:.1f}")
                print(" | ".join(f"{c:>11}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
