"""Throughput of the bare ONNX Runtime session of the matting runtime (no Ray, no decode).

Runs :class:`vbatch.models.matting.predictor.MattingPredictor.forward` on one 1024×768 RGB image, repeatedly.
The model is a STAND-IN: the small test graph of ``tests/models/tf_graphs.py`` converted with
``convert_graph`` when TensorFlow is importable (the ``convert`` extra), else the demo ONNX model.
Neither is ModelScope's U-Net: the figures measure the runtime's overhead (casts, session call,
copies) on small graphs, not the real model's speed — run it with ``--model-dir`` on a converted
``damo/cv_unet_image-matting`` directory for that.

    python bench/bench_matting_model.py [--model-dir DIR] [--threads 1 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import tempfile
import time
from pathlib import Path

from vbatch.models.matting import load
from vbatch.models.matting.convert import sample_image
from vbatch.models.matting.modeldir import write_random_model_dir as write_demo_model_dir


def stand_in_model_dir(root: Path) -> tuple[Path, str]:
    """A converted test graph (TensorFlow available) or the demo model; and which one."""
    if importlib.util.find_spec("tensorflow") is None:
        return write_demo_model_dir(root / "demo"), "demo ONNX model (no TensorFlow here)"
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests/
    from tests.models.tf_graphs import build_matting_graph  # imports TF after torch
    from vbatch.models.matting.convert import convert_graph

    d = root / "test_graph"
    build_matting_graph(d / "tf_graph.pb")
    report = convert_graph(d, check_images=[sample_image(96, 128)])
    return d, f"test graph converted by tf2onnx (max |diff| alpha {report.max_abs_diff_alpha})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seconds", type=float, default=5.0, help="time budget per setting")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        if args.model_dir:
            model_dir, what = args.model_dir, str(args.model_dir)
        else:
            model_dir, what = stand_in_model_dir(Path(tmp))
        image = sample_image(768, 1024)
        print(f"model: {what}; image 1024x768; device {args.device}")
        for threads in args.threads:
            model = load(model_dir, device=args.device, threads=threads)
            model.forward([image])  # warm-up: session planning for this shape
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < args.seconds:
                model.forward([image])
                n += 1
            elapsed = time.perf_counter() - start
            print(
                f"  threads={threads}: {n / elapsed:7.1f} images/s  ({1000 * elapsed / n:.1f} ms/image)"
            )


if __name__ == "__main__":
    main()
