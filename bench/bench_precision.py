"""Benchmark: every torch model's bare forward at fp32 vs bf16 (CPU) or fp16 (CUDA), side by side.

For each model, full size, random weights in ModelScope's layout, inputs made from real photographs
(scikit-image's bundled images): images/s of the bare forward (preprocessed batch in memory) at
each precision, rounds interleaved so that a shared machine's load hits all of them alike, and the
deviation of each reduced precision from fp32 on the same inputs — masks: mean and 99th percentile
of |Δ| in grey levels and IoU of the binarised mask; embeddings: min cosine and the change of
recall@10 and mAP on a small synthetic re-ID gallery (jittered crops of the photographs, two
cameras). Rates are given by wall clock (best round) and by the process's CPU time (median round,
``threads`` / CPU seconds per image: what an unshared machine would do, when others' work inflates
the wall clock; OpenMP threads wait passively so that CPU time is work).

    python bench/bench_precision.py                                  # CPU: fp32 vs bf16
    python bench/bench_precision.py --models reid --rounds 5
    python bench/bench_precision.py --device cuda --precisions fp32 bf16 fp16
    python bench/bench_precision.py --models matting                 # ONNX Runtime's CPU options

``matting`` (needs the ``convert`` extra: TensorFlow builds the graph) runs a stand-in of
ModelScope's graph — a 4-level U-Net (32–256 channels, random weights) with the real graph's
interface, converted by ``vbatch matting convert``'s code — under today's session options and the
alternatives ONNX Runtime offers on x86 (other graph optimisation levels, threads, no spinning,
dynamic and static int8 quantization; its bf16 GEMM option exists only on ARM64), with the
deviation of the alpha from today's session.
"""

from __future__ import annotations

import os

# before torch starts its thread pool: a waiting thread sleeps instead of spinning, so that the
# CPU time of a forward is its work even when other processes share the cores
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vbatch.models import load_model
from vbatch.models.precision import mask_deviation, min_cosine, resolve_precision

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")
MODELS = ("salient", "u2net", "reid", "shop-seg", "rvos", "matting")
#: batch per forward: salient and reid as in issue 27's figures, shop-seg one 1024² image (11 s fp32
#: on 2 cores), rvos one window of frames with one query
BATCH = {"salient": 8, "u2net": 8, "reid": 16, "shop-seg": 1, "rvos": 8}


def photos() -> list[np.ndarray]:
    from skimage import data

    return [np.ascontiguousarray(getattr(data, n)()) for n in PHOTOS]


def person_crops(images: list[np.ndarray], n: int, seed: int) -> list[np.ndarray]:
    """``n`` person-shaped (2:1) crops of the photographs."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        im = images[i % len(images)]
        h, w = im.shape[:2]
        ch = int(h * rng.uniform(0.35, 0.8))
        cw = min(w, ch // 2)
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        out.append(im[y : y + ch, x : x + cw])
    return out


def jitter(crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Another view of the same "person": shifted and rescaled crop, maybe mirrored, other light."""
    h, w = crop.shape[:2]
    dy, dx = int(h * rng.uniform(0, 0.12)), int(w * rng.uniform(0, 0.12))
    sh, sw = int(h * rng.uniform(0.85, 1.0)), int(w * rng.uniform(0.85, 1.0))
    view = crop[dy : dy + sh, dx : dx + sw].astype(np.float32) * rng.uniform(0.75, 1.25)
    if rng.random() < 0.5:
        view = view[:, ::-1]
    return np.ascontiguousarray(np.clip(view, 0, 255).astype(np.uint8))


def write_model(name: str, root: Path) -> Path:
    """A full-size random-weights model directory (kept in ``root`` between runs)."""
    d = root / name
    if d.is_dir() and any(d.iterdir()):
        return d
    if name in ("salient", "u2net"):
        from vbatch.models.salient.config import SENET, U2NET
        from vbatch.models.salient.modeldir import write_random_model_dir

        return write_random_model_dir(d, SENET if name == "salient" else U2NET)
    if name == "reid":
        from vbatch.models.reid.modeldir import write_random_model_dir as write_reid

        return write_reid(d)
    if name == "shop-seg":
        from vbatch.models.shop_seg import FULL
        from vbatch.models.shop_seg.modeldir import write_random_model_dir as write_shop

        return write_shop(d, config=FULL)
    from vbatch.models.rvos import FULL as RVOS_FULL
    from vbatch.models.rvos.modeldir import write_random_model_dir as write_rvos

    return write_rvos(d, config=RVOS_FULL)


@dataclass
class Setup:
    """One model at one precision: a timed call, and what its outputs are compared by."""

    images: int  # per call
    call: Callable[[], Any]
    products: Callable[[Any], Any]  # the call's output -> what deviation is measured on


@dataclass
class Result:
    model: str
    precision: str
    images_per_call: int
    wall_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    deviation: dict[str, float] = field(default_factory=dict)


def setup(name: str, model_dir: Path, precision: str, device: str) -> Setup:
    pics = photos()
    registry_name = "salient" if name == "u2net" else name
    p: Any = load_model(registry_name, model_dir, device=device, precision=precision)
    if name in ("salient", "u2net"):
        inputs = [p.transforms.preprocess(im) for im in (pics * 2)[: BATCH[name]]]
        sizes = [im.shape[:2] for im in (pics * 2)[: BATCH[name]]]
        return Setup(
            len(inputs),
            lambda: p.forward(inputs),
            lambda out: np.concatenate(
                [p.transforms.postprocess(o, s).ravel() for o, s in zip(out, sizes, strict=True)]
            ),
        )
    if name == "reid":
        inputs = [p.transforms.preprocess(c) for c in person_crops(pics, BATCH[name], seed=1)]
        return Setup(len(inputs), lambda: p.forward(inputs), lambda out: np.stack(out))
    if name == "shop-seg":
        inputs = [p.transforms.preprocess(im) for im in pics[: BATCH[name]]]

        def shop_products(logits: torch.Tensor) -> dict[str, np.ndarray]:
            with torch.inference_mode():
                prob = p.model.segment_probabilities(logits)[:, 1]
                return {"prob": prob.cpu().numpy() * 255, "mask": (prob > 0.5).cpu().numpy() * 255}

        return Setup(len(inputs), lambda: p.logits(inputs), shop_products)
    # rvos: a camera panning over a photograph, one window, one query
    from vbatch.models.rvos.transforms import preprocess_frames, select_trajectory

    im = pics[5]
    frames = np.stack([im[20 + 8 * t : 380 + 8 * t, 30 + 12 * t : 670 + 12 * t] for t in range(BATCH[name])])  # fmt: skip
    clip = preprocess_frames(frames)

    def rvos_products(out: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        logits, _ = select_trajectory(out["pred_is_referred"], out["pred_masks"])
        prob = logits.sigmoid().cpu().numpy()
        return {"prob": prob * 255, "mask": (prob > 0.5) * 255.0}

    return Setup(len(frames), lambda: p.run_network(clip, ["the bright star"]), rvos_products)


def deviation(name: str, ref: Any, out: Any) -> dict[str, float]:
    if name == "reid":
        return {"min_cos": min_cosine(ref, out)}
    if isinstance(ref, dict):  # a probability map, and the mask thresholded from it
        d = mask_deviation(ref["prob"], out["prob"])
        d["iou"] = mask_deviation(ref["mask"], out["mask"])["iou"]
        return d
    return mask_deviation(ref, out)


def reid_gallery(model_dir: Path, precisions: list[str], device: str, ids: int) -> dict[str, dict]:
    """recall@10 and mAP of a synthetic gallery at each precision (one query per identity, cam 0;
    four views per identity in the gallery, cam 1)."""
    import pyarrow as pa

    from vbatch.operators.reid_eval import evaluate

    rng = np.random.default_rng(7)
    bases = person_crops(photos(), ids, seed=3)
    views = [
        (pid, cam, jitter(b, rng)) for pid, b in enumerate(bases, 1) for cam in (0, 1, 1, 1, 1)
    ]
    out: dict[str, dict] = {}
    for precision in precisions:
        p: Any = load_model("reid", model_dir, device=device, precision=precision)
        emb = np.concatenate([np.stack(p.predict([v for _, _, v in views[i : i + 32]])) for i in range(0, len(views), 32)])  # fmt: skip

        def table(cam: int, emb: np.ndarray = emb) -> pa.Table:
            rows = [i for i, (_, c, _) in enumerate(views) if c == cam]
            return pa.table(
                {
                    "embedding": [e.tolist() for e in emb[rows]],
                    "person_id": [views[i][0] for i in rows],
                    "camera_id": [cam] * len(rows),
                }
            )

        r = evaluate(table(0), table(1))
        out[precision] = {"recall@10": r["cmc@10"], "mAP": r["mAP"]}
    return out


def build_unet_graph(
    path: Path, widths: tuple[int, ...] = (32, 64, 128, 256), seed: int = 0
) -> None:
    """A TF1 frozen U-Net with the matting graph's interface (``input_image`` → ``output_png``)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests/
    from tests.models.tf_graphs import import_tensorflow  # TF after torch (see that module)

    tf = import_tensorflow()
    rng = np.random.default_rng(seed)

    def conv(x: Any, cin: int, cout: int) -> Any:
        w = rng.standard_normal((3, 3, cin, cout)) * np.sqrt(2.0 / (9 * cin))
        b = rng.uniform(-0.05, 0.05, cout)
        y = tf.nn.conv2d(x, w.astype(np.float32), [1, 1, 1, 1], "SAME") + b.astype(np.float32)
        return tf.nn.relu(y)

    g = tf.Graph()
    with g.as_default():
        image = tf.placeholder(tf.float32, shape=[None, None, 3], name="input_image")
        x, skips, cin = tf.expand_dims(image, 0) / 127.5 - 1.0, [], 3
        for i, c in enumerate(widths):
            x = tf.nn.max_pool2d(x, 2, 2, "SAME") if i else x
            x, cin = conv(conv(x, cin, c), c, c), c
            skips.append(x)
        for i in range(len(widths) - 2, -1, -1):
            up = tf.image.resize_bilinear(x, tf.shape(skips[i])[1:3], half_pixel_centers=True)
            c = widths[i]
            x, cin = conv(conv(tf.concat([up, skips[i]], axis=-1), cin + c, c), c, c), c
        head = (rng.standard_normal((1, 1, cin, 1)) * 0.5 * np.sqrt(2.0 / cin)).astype(np.float32)
        alpha = tf.sigmoid(tf.nn.conv2d(x, head, [1, 1, 1, 1], "SAME"))[0] * 255.0
        tf.cast(tf.concat([image, alpha], axis=-1), tf.uint8, name="output_png")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(g.as_graph_def().SerializeToString())


def bench_matting(root: Path, threads: int, rounds: int) -> None:
    """Today's ONNX Runtime session vs the alternatives, on the U-Net stand-in (see the docstring)."""
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from PIL import Image

    from vbatch.models.matting.convert import convert_graph, sample_image
    from vbatch.models.matting.model import session_options

    d = root / "matting-unet"
    if not (d / "model.onnx").is_file():
        build_unet_graph(d / "tf_graph.pb")
        convert_graph(d, check_images=[sample_image(96, 128)])

    def fit(im: np.ndarray, side: int) -> np.ndarray:
        h, w = im.shape[:2]
        s = side / max(h, w)
        small = Image.fromarray(im).resize((round(w * s), round(h * s)), Image.Resampling.BILINEAR)
        return np.asarray(small).astype(np.float32)

    pics = photos()
    calib, evals = [fit(p, 384) for p in pics[3:]], [fit(p, 640) for p in pics[:3]]
    # 768 px: seven live sessions' arenas at 1024² (~1.5 GB each) got the process killed on the
    # shared 24 GiB machine
    timed = fit(pics[0], 768)
    dyn, qdq = d / "model.int8-dynamic.onnx", d / "model.int8-qdq.onnx"
    if not dyn.is_file():
        quantize_dynamic(str(d / "model.onnx"), str(dyn), weight_type=QuantType.QInt8)

    class Calibration(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter([{"input_image": c} for c in calib])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    if not qdq.is_file():  # per-channel int8 weights, uint8 activations calibrated on photos
        quantize_static(
            str(d / "model.onnx"),
            str(qdq),
            Calibration(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    level = ort.GraphOptimizationLevel
    variants: dict[str, tuple[Path, dict[str, Any]]] = {
        f"today: ORT_ENABLE_ALL, {threads} threads": (d / "model.onnx", {}),
        "ORT_ENABLE_EXTENDED": (d / "model.onnx", {"level": level.ORT_ENABLE_EXTENDED}),
        "ORT_ENABLE_BASIC": (d / "model.onnx", {"level": level.ORT_ENABLE_BASIC}),
        "intra-op spinning off": (d / "model.onnx", {"spin": False}),
        "1 thread": (d / "model.onnx", {"threads": 1}),
        "int8 dynamic (quantize_dynamic)": (dyn, {}),
        "int8 static QDQ (quantize_static)": (qdq, {}),
    }

    def session(path: Path, threads: int = threads, level: Any = None, spin: bool = True) -> Any:
        so = session_options(threads)
        if level is not None:
            so.graph_optimization_level = level
        if not spin:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])

    sessions = {k: session(p, **kw) for k, (p, kw) in variants.items()}

    def alphas(s: Any) -> np.ndarray:
        return np.concatenate([s.run(None, {"input_image": e})[0][..., 3].ravel() for e in evals])

    ref = alphas(next(iter(sessions.values()))).astype(np.int32)
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in sessions}
    for s in sessions.values():
        s.run(None, {"input_image": timed})  # plan for this shape
    for _ in range(rounds):
        for k, s in sessions.items():
            w, c = time.perf_counter(), time.process_time()
            s.run(None, {"input_image": timed})
            times[k].append((time.perf_counter() - w, time.process_time() - c))
    print(
        f"matting stand-in U-Net, one {timed.shape[1]}x{timed.shape[0]} image; alpha vs today on 3 photos"
    )
    base_w = base_c = 0.0
    for k, s in sessions.items():
        wall = min(t[0] for t in times[k])
        cpu = statistics.median(t[1] for t in times[k])
        base_w, base_c = base_w or wall, base_c or cpu
        dev = np.abs(alphas(s).astype(np.int32) - ref)
        print(
            f"  {k:<36} {wall:6.2f} s wall ({base_w / wall:4.2f}x)  {cpu:6.2f} s CPU "
            f"({base_c / cpu:4.2f}x)  alpha |Δ| max {dev.max()}, mean {dev.mean():.3f}, "
            f"p99 {np.percentile(dev, 99):.0f}",
            flush=True,
        )


def load_now() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", nargs="+", default=list(MODELS[:-1]), choices=MODELS)
    ap.add_argument("--precisions", nargs="+", default=None, help="default: fp32 and auto's choice")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per precision")
    ap.add_argument("--gallery-ids", type=int, default=30, help="re-ID gallery identities")
    ap.add_argument("--model-root", type=Path, help="keep the random model directories here")
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    chosen, reason = resolve_precision("auto", args.device)
    precisions = args.precisions or (["fp32", chosen] if chosen != "fp32" else ["fp32", "bf16"])
    if precisions[0] != "fp32":
        precisions = ["fp32", *[p for p in precisions if p != "fp32"]]
    root = args.model_root or Path(tempfile.mkdtemp(prefix="vbatch-precision-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"device {args.device}, {args.threads} threads; auto -> {reason}")
    print(f"load before: {load_now()}")
    report: dict[str, Any] = {"device": args.device, "threads": args.threads, "auto": reason}
    report["load_before"] = load_now()
    results: list[Result] = []
    for name in args.models:
        if name == "matting":
            bench_matting(root, args.threads, args.rounds)
            continue
        model_dir = write_model(name, root)
        setups = {p: setup(name, model_dir, p, args.device) for p in precisions}
        rows = {p: Result(name, p, s.images) for p, s in setups.items()}
        products = {p: s.products(s.call()) for p, s in setups.items()}  # warm-up, and the outputs
        for _ in range(args.rounds):
            for p, s in setups.items():  # interleaved: the machine's load falls on each alike
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                w, c = time.perf_counter(), time.process_time()
                s.call()
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                rows[p].wall_s.append(time.perf_counter() - w)
                rows[p].cpu_s.append(time.process_time() - c)
        for p in precisions[1:]:
            rows[p].deviation = deviation(name, products["fp32"], products[p])
        if name == "reid":
            gallery = reid_gallery(model_dir, precisions, args.device, args.gallery_ids)
            for p in precisions:
                ref = gallery["fp32"]
                rows[p].deviation.update(
                    {f"{k} (fp32 {ref[k]:.4f})": v - ref[k] for k, v in gallery[p].items()}
                )
        results += rows.values()
        del setups
        print_model(list(rows.values()), args.threads)
    report["load_after"] = load_now()
    print(f"load after: {report['load_after']}")
    report["results"] = [r.__dict__ for r in results]
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


def print_model(rows: list[Result], threads: int) -> None:
    base = rows[0]

    def rates(r: Result) -> tuple[float, float]:
        wall = r.images_per_call / min(r.wall_s)
        cpu = r.images_per_call * threads / statistics.median(r.cpu_s)
        return wall, cpu

    bw, bc = rates(base)
    for r in rows:
        w, c = rates(r)
        dev = ", ".join(
            f"{k} {v:.6f}" if k == "min_cos" else f"{k} {v:+.4f}" if "fp32" in k else f"{k} {v:.3f}"
            for k, v in r.deviation.items()
        )
        print(
            f"{r.model:<9} {r.precision:<5} {w:7.2f} img/s wall ({w / bw:4.2f}x)  "
            f"{c:7.2f} img/s by CPU time ({c / bc:4.2f}x)  {dev}",
            flush=True,
        )


if __name__ == "__main__":
    main()
