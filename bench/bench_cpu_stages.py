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
from vbatch.operators.decode import decode_image, open_image, probe_jpeg
from vbatch.operators.device_decode import DeviceDecoder
from vbatch.operators.images import (
    _PIL_INPUT,
    DECODE_MODES,
    OUTPUT,
    decode_and_preprocess,
    fetch_bytes,
    network_size,
)
from vbatch.operators.manifest import ERROR
from vbatch.operators.outputs import (
    OutputOptions,
    encode_jpeg,
    encode_png,
    model_resolution_mask,
    write_products,
)
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


def build_transforms(task: str) -> Transforms | None:
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
        from vbatch.models.reid.config import FULL
        from vbatch.models.reid.transforms import ReidTransforms

        return ReidTransforms(FULL.image_size, FULL.embed_dim)
    return None  # rvos: per-frame functions of operators.video / models.rvos


def standin_output(
    task: str, net_input: np.ndarray, rng: np.random.Generator, embed_dim: int = 1536
) -> np.ndarray:
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
        return rng.standard_normal(embed_dim).astype(np.float32)
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
    if decode_kw.get("decode") == "gpu":
        size, net_input = _shipped_input(t, blob, transforms)
    else:
        size, net_input = _decoded_input(t, blob, transforms, decode_kw.get("decode") == "fast")
    raw = encode_array(standin_output(task, net_input, rng))  # the model actor's column
    model_size = output_options.mask_size == "model" and output_options.output == "mask"

    def post() -> np.ndarray:
        output = decode_array(raw)
        if model_size:
            return model_resolution_mask(transforms, output, size)
        if task == "matting" and output.shape[:2] != size:
            original = decode_image(blob)  # the write stage decodes the original again
            return transforms.postprocess(output, size, image=original)  # type: ignore[call-arg]
        return transforms.postprocess(output, size)

    product = t.run("postprocess", post)
    files = t.run("encode", _encode_products, task, product)
    for name, data in files.items():
        t.run("write", storage.write_bytes, str(out_dir / name), data)
    return t.ms


def _decoded_input(
    t: Timer, blob: bytes, transforms: Transforms, fast: bool
) -> tuple[tuple[int, int], np.ndarray]:
    """Exact/fast: the stages of operators.images._decode_for, split for timing."""
    decoded = t.run(
        "decode",
        open_image,
        blob,
        min_size=(lambda hw: network_size(transforms, hw)) if fast else None,
    )
    pil_ok = isinstance(transforms, _PIL_INPUT) and not isinstance(decoded.image, np.ndarray)
    image = decoded.image if pil_ok else t.run("decode", decoded.array)
    shipped = t.run("preprocess", lambda: encode_array(transforms.preprocess(image)))
    return decoded.size, decode_array(shipped)


_DECODERS: dict[int, DeviceDecoder] = {}
#: where ``--decode gpu``'s actor decodes (``--actor-device``)
ACTOR_DEVICE = "cpu"


def _actor_decoder(transforms: Transforms) -> DeviceDecoder:
    if id(transforms) not in _DECODERS:
        _DECODERS[id(transforms)] = DeviceDecoder(transforms, torch.device(ACTOR_DEVICE))
    return _DECODERS[id(transforms)]


def _shipped_input(
    t: Timer, blob: bytes, transforms: Transforms
) -> tuple[tuple[int, int], np.ndarray]:
    """``--decode gpu``: the CPU stage reads the header and ships the file; the actor's decode (on
    ``--actor-device``; the CPU is the no-GPU fallback) is timed apart, as "actor": host CPU ms
    (with a GPU, what the decode still costs the host) and "actor wall" ms."""
    size = t.run("decode", probe_jpeg, blob)
    assert size is not None, "the bench's images are RGB JPEGs"
    shipped = t.run("preprocess", lambda: encode_array(np.frombuffer(blob, np.uint8)))
    wall = time.perf_counter()
    (net_input,) = t.run("actor", _actor_decoder(transforms), [decode_array(shipped)])
    t.ms["actor wall"] = (time.perf_counter() - wall) * 1e3  # the result is on the host: synced
    assert isinstance(net_input, np.ndarray), net_input  # else: the decode's error message
    return size, net_input


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
    from vbatch.models.rvos.transforms import frame_masks, resized_size
    from vbatch.operators.video.decode import resize_frames

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
    if decode_kw.get("decode") == "gpu":  # the actor's work, not the CPU stages'
        inputs = _actor_decoder(transforms)(inputs)  # type: ignore[assignment]
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


def textured_image(seed: int, size: tuple[int, int]) -> np.ndarray:
    """A product photo overlaid with fine texture (1–3 px stripes and grain): what DCT scaling and
    resizing disagree on most."""
    w, h = size
    img = product_image(seed, size).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    period = 2.0 + seed % 3
    stripes = 25.0 * np.sin(2 * np.pi * (xx + 0.5 * yy) / period)
    grain = np.random.default_rng(seed).normal(0, 12, (h, w))
    return np.clip(img + (stripes + grain)[..., None], 0, 255).astype(np.uint8)


def compare_modes(tasks: list[str], n: int, mp: float, mode: str = "fast") -> None:
    """``mode`` (fast or gpu, the actor decoding on ``--actor-device``) vs exact decode, per task, through a random-weight network where one is cheap enough
    on a CPU (salient full size; shop-seg and reid TINY): mask grey-level difference, IoU,
    embedding cosine, and the network inputs' mean absolute difference. Random weights make this
    a weak proxy for trained models; the input difference does not depend on the weights."""
    from vbatch.models import load_model

    w, h = SIZES[mp]
    photos = [encode(product_image(s, (w, h)), "JPEG", quality=90) for s in range(n)]
    photos += [encode(textured_image(s, (w, h)), "JPEG", quality=90) for s in range(n)]
    crops = [
        encode(person_crop(s, s % 5, (round((w * h / 2) ** 0.5),) * 2), "JPEG", quality=90)
        for s in range(n)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for task in tasks:
            predictor = None
            if task == "salient":
                from vbatch.models.salient.modeldir import write_random_model_dir

                predictor = load_model(task, write_random_model_dir(Path(tmp) / task), "cpu")
            elif task == "shop-seg":
                from vbatch.models.shop_seg import TINY
                from vbatch.models.shop_seg.modeldir import write_random_model_dir as write_shop

                predictor = load_model(task, write_shop(Path(tmp) / task, config=TINY), "cpu")
            elif task == "reid":
                from vbatch.models.reid import TINY as REID_TINY
                from vbatch.models.reid.modeldir import write_random_model_dir as write_reid

                predictor = load_model(task, write_reid(Path(tmp) / task, REID_TINY), "cpu")
            transforms = predictor.transforms if predictor else build_transforms(task)
            if transforms is None:
                continue
            blobs = crops if task == "reid" else photos
            batch = {
                m: decode_and_preprocess(_table(blobs), transforms=transforms, decode=m)
                for m in ("exact", mode)
            }
            x = {
                m: [decode_array(v) for v in batch[m].column("_vb_input").to_pylist()]
                for m in batch
            }
            if mode == "gpu":
                x[mode] = _actor_decoder(transforms)(x[mode])  # type: ignore[assignment]
            sizes = list(
                zip(
                    batch["exact"].column("height").to_pylist(),
                    batch["exact"].column("width").to_pylist(),
                    strict=True,
                )
            )
            inp = [
                np.abs(a.astype(np.float64) - b).mean()
                for a, b in zip(x["exact"], x[mode], strict=True)
            ]
            line = f"{task:>9} {mp:g} MP: input |Δ| mean {np.mean(inp):.3f} max-of-means {np.max(inp):.3f}"
            if predictor is not None:
                with torch.inference_mode():
                    out = {m: predictor.forward(x[m]) for m in x}
                prod = {
                    m: [transforms.postprocess(o, sz) for o, sz in zip(out[m], sizes, strict=True)]
                    for m in out
                }
                if task == "salient":
                    d = [
                        np.abs(a.astype(np.int16) - b)
                        for a, b in zip(prod["exact"], prod[mode], strict=True)
                    ]
                    line += f"; mask |Δ| mean {np.mean([v.mean() for v in d]):.2f} max {max(v.max() for v in d)}"
                elif task == "shop-seg":
                    iou = [
                        ((a > 0) & (b > 0)).sum() / max(1, ((a > 0) | (b > 0)).sum())
                        for a, b in zip(prod["exact"], prod[mode], strict=True)
                    ]
                    line += f"; IoU mean {np.mean(iou):.4f} min {np.min(iou):.4f}"
                else:
                    cos = [
                        float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
                        for a, b in zip(prod["exact"], prod[mode], strict=True)
                    ]
                    line += f"; cosine mean {np.mean(cos):.5f} min {np.min(cos):.5f}"
            print(line, flush=True)


def _table(blobs: list[bytes]) -> pa.Table:
    n = len(blobs)
    return pa.table(
        {
            "image_id": pa.array([str(i) for i in range(n)]),
            ERROR: pa.array([None] * n, pa.string()),
            "_vb_bytes": pa.array(blobs, pa.large_binary()),
        }
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--sizes", nargs="+", type=float, default=list(SIZES), choices=list(SIZES))
    p.add_argument("--repeats", type=int, default=5, help="runs per figure; the median is shown")
    p.add_argument("--batch", type=int, default=4, help="images per operator-total run")
    p.add_argument(
        "--decode",
        choices=list(DECODE_MODES),
        default="exact",
        help="gpu: the CPU stages read the header and ship the file (salient, shop-seg, matting); "
        "the actor's decode shows apart as 'actor' (CPU ms)",
    )
    p.add_argument(
        "--actor-device",
        default="cpu",
        help="--decode gpu: where the actor decodes (cpu, the fallback, or cuda)",
    )
    p.add_argument("--mask-size", choices=["full", "model"], default="full")
    p.add_argument(
        "--compare",
        type=int,
        metavar="N",
        help="instead: --decode fast (the default here) or gpu vs exact decode on N photos + N "
        "textured images (or N crops) per task",
    )
    args = p.parse_args()
    global ACTOR_DEVICE
    ACTOR_DEVICE = args.actor_device
    if args.compare:
        torch.set_num_threads(1)
        mode = "fast" if args.decode == "exact" else args.decode
        for mp in args.sizes:
            compare_modes(args.tasks, args.compare, mp, mode)
        return

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    storage = Storage(StorageOptions())
    rng = np.random.default_rng(0)
    if args.decode == "gpu":
        args.tasks = [t for t in args.tasks if t in ("salient", "shop-seg", "matting")]
    header = ["task", "MP", *STAGES, "sum", "operators"]
    if args.decode == "gpu":
        header += ["actor", "actor wall"]
    decode_kw = {"decode": args.decode}
    print(
        f"CPU ms per image (median of {args.repeats}), one thread, --decode {args.decode}, "
        f"--mask-size {args.mask_size}"
    )
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
                    embedding_dim=getattr(transforms, "embed_dim", None),
                    mask_size=args.mask_size if output_kind(task) == "mask" else "full",
                )
            )
            for mp in args.sizes:
                paths = []
                for i in range(max(1, args.batch)):
                    path = root / f"{task}-{mp}-{i}.jpg"
                    path.write_bytes(make_image(task, mp, seed=i))
                    paths.append(path)
                runs = [
                    one_image(task, paths[0], root, storage, transforms, rng, decode_kw, options)
                    for _ in range(args.repeats + 1)
                ][1:]  # the first run warms caches and lazy imports
                med = {s: statistics.median(r.get(s, 0.0) for r in runs) for s in STAGES}
                total = sum(med.values())
                ops = float("nan")
                if transforms is not None and options is not None:
                    ops = statistics.median(
                        operators_per_image(
                            task, paths, root, storage, transforms, rng, options, decode_kw
                        )
                        for _ in range(max(1, args.repeats // 2))
                    )
                cells = [task, f"{mp:g}", *(f"{med[s]:.1f}" for s in STAGES), f"{total:.1f}"]
                cells.append(f"{ops:.1f}")
                if args.decode == "gpu":
                    for col in ("actor", "actor wall"):
                        cells.append(f"{statistics.median(r.get(col, 0.0) for r in runs):.1f}")
                print(" | ".join(f"{c:>11}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
