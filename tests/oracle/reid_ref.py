"""Reference outputs of ModelScope's PASS person re-ID pipeline with random weights (oracle env only).

Usage: python reid_ref.py OUT_DIR [--check-dir DIR]

Builds ModelScope's ``PASS`` model (models/cv/image_reid_person) for a few configurations, randomises
every parameter and buffer (BatchNorm statistics included), saves each in ModelScope's model-directory
layout under ``OUT_DIR/<case>/`` (``configuration.json`` + ``pytorch_model.pt``), loads it back through
``pipeline(Tasks.image_reid_person, model=dir)`` — checking that the reference's forgiving loader
really copied every weight — and runs it on a few person-crop-like RGB images given as PIL images (a
numpy input would be taken as BGR). Writes ``OUT_DIR/<case>/ref.npz`` with:

* ``image_<i>``: the RGB uint8 inputs (different sizes);
* ``input``: (N, 3, H, W) float32, the pipeline's preprocessed tensors (``pipe.preprocess``);
* ``pipeline``: (N, E) the pipeline's ``img_embedding``, one ``pipe(pil_image)`` call per image — the
  model run on exactly ``input``.

``--check-dir DIR``: also run the pipeline on a model directory written by vbatch
(``vbatch.models.reid.modeldir.write_random_model_dir``), checking that every weight is copied, into ``OUT_DIR/check/ref.npz``.

Cases: one full-size (256×128, stride 16, multi-neck) checkpoint shared by three configurations
(cat/before — the released one —, cat/after, mean/after; only the unused classifier's shape differs),
and a smaller-input one (64×32, overlapping strides 10×8, a single BN neck, mean/after). The reference
hard-codes ViT-B/16, so every checkpoint is full width and depth.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CASES = {
    # name: (checkpoint group, size, stride, multi_neck, fusion, neck_feat)
    "full_cat_before": ("full", [256, 128], [16, 16], True, "cat", "before"),
    "full_cat_after": ("full", [256, 128], [16, 16], True, "cat", "after"),
    "full_mean_after": ("full", [256, 128], [16, 16], True, "mean", "after"),
    "small_single_mean_after": ("small", [64, 32], [10, 8], False, "mean", "after"),
}
IMAGE_SIZES = [(311, 118), (128, 64), (75, 170)]


def configuration(size, stride, multi_neck, fusion, neck_feat) -> dict:
    return {
        "framework": "pytorch",
        "task": "image-reid-person",
        "pipeline": {"type": "passvitb-image-reid-person"},
        "model": {
            "type": "passvitb",
            "cfg": {
                "INPUT": {
                    "SIZE_TRAIN": size,
                    "SIZE_TEST": size,
                    "PIXEL_MEAN": [0.485, 0.456, 0.406],
                    "PIXEL_STD": [0.229, 0.224, 0.225],
                },
                "MODEL": {
                    "SIE_COE": 3.0,
                    "STRIDE_SIZE": stride,
                    "DROP_PATH": 0.1,
                    "DROP_OUT": 0.0,
                    "ATT_DROP_RATE": 0.0,
                    "GEM_POOLING": False,
                    "STEM_CONV": False,
                    "DROPOUT_RATE": 0.0,
                    "MULTI_NECK": multi_neck,
                    "FEAT_FUSION": fusion,
                },
                "TEST": {"NECK_FEAT": neck_feat},
                "DATASETS": {"NUM_CLASSES": 751},
            },
        },
    }


def person_like(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth background with a few coloured ellipses (head, torso, legs) and some noise."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([80 + 60 * yy / h, 90 + 50 * xx / w, 120 - 40 * yy / h], axis=-1)
    for cy, ry, rx in ((0.12, 0.08, 0.15), (0.38, 0.2, 0.3), (0.75, 0.22, 0.22)):
        cx = 0.5 + rng.uniform(-0.1, 0.1)
        mask = ((yy / h - cy) / ry) ** 2 + ((xx / w - cx) / rx) ** 2 < 1
        img[mask] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


@torch.no_grad()
def randomize(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Every parameter and buffer: unit-variance activations, BN statistics away from identity."""
    for name, t in model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            t.fill_(int(torch.randint(1, 10000, (), generator=gen)))
        elif name.endswith("running_var"):
            t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
        elif name.endswith(("running_mean", "bias")):
            t.copy_(0.1 * torch.randn(t.shape, generator=gen))
        elif name.endswith(("_token", "_token1", "_token2", "_token3", "_pos", "pos_embed")):
            t.copy_(0.5 * torch.randn(t.shape, generator=gen))
        elif t.ndim == 1:
            t.copy_(1.0 + 0.1 * torch.randn(t.shape, generator=gen))
        else:
            t.copy_(torch.randn(t.shape, generator=gen) / math.sqrt(t[0].numel()))


def check_loaded(model: torch.nn.Module, saved: dict, ignore: tuple[str, ...] = ()) -> None:
    """The reference loader skips silently; make sure it copied every weight it needs."""
    bad = []
    for k, v in model.state_dict().items():
        if k.startswith(ignore):
            continue
        if k not in saved or saved[k].shape != v.shape or not torch.equal(saved[k], v):
            bad.append(k)
    if bad:
        raise SystemExit(f"reference did not load {len(bad)} weights: {bad[:20]}")


def run_pipeline(model_dir: Path, images: list[np.ndarray]) -> tuple[object, dict]:
    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks

    pipe = pipeline(Tasks.image_reid_person, model=str(model_dir), device="cpu")
    inputs, e2e = [], []
    for rgb in images:
        pil = Image.fromarray(rgb)  # PIL = RGB for the reference; numpy would be read as BGR
        inputs.append(pipe.preprocess(pil)["img"])
        e2e.append(np.asarray(pipe(pil)["img_embedding"])[0])
    out = {f"image_{i}": im for i, im in enumerate(images)}
    out.update(
        input=torch.cat(inputs).numpy().astype(np.float32),
        pipeline=np.stack(e2e).astype(np.float32),
    )
    return pipe, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--check-dir", type=Path, default=None)
    args = ap.parse_args()
    torch.set_grad_enabled(False)

    from modelscope.models.cv.image_reid_person.pass_model import PASS
    from modelscope.utils.config import Config

    rng = np.random.default_rng(0)
    images = [person_like(h, w, rng) for h, w in IMAGE_SIZES]
    gen = torch.Generator().manual_seed(0)
    checkpoints: dict[str, Path] = {}
    for case, (group, size, stride, multi_neck, fusion, neck_feat) in CASES.items():
        d = args.out_dir / case
        d.mkdir(parents=True, exist_ok=True)
        (d / "configuration.json").write_text(
            json.dumps(configuration(size, stride, multi_neck, fusion, neck_feat))
        )
        if group not in checkpoints:
            # PASS.__init__ reads the checkpoint: give it an empty one, then randomise and save
            torch.save({}, d / "pytorch_model.pt")
            cfg = Config.from_file(str(d / "configuration.json")).model.cfg
            model = PASS(cfg, str(d))
            randomize(model, gen)
            torch.save(model.state_dict(), d / "pytorch_model.pt")
            checkpoints[group] = d / "pytorch_model.pt"
            del model
        else:
            os.link(checkpoints[group], d / "pytorch_model.pt")
        saved = torch.load(d / "pytorch_model.pt", map_location="cpu", weights_only=True)
        pipe, out = run_pipeline(d, images)
        # groups share one checkpoint across fusions: only the unused classifier's shape differs
        check_loaded(pipe.model, saved, ignore=("classifier.",))
        np.savez(d / "ref.npz", **out)
        print(f"{case}: embedding {out['pipeline'].shape}", file=sys.stderr)
        del pipe

    if args.check_dir is not None:
        saved = torch.load(
            args.check_dir / "pytorch_model.pt", map_location="cpu", weights_only=True
        )
        pipe, out = run_pipeline(args.check_dir, images)
        check_loaded(pipe.model, saved)
        (args.out_dir / "check").mkdir(parents=True, exist_ok=True)
        np.savez(args.out_dir / "check" / "ref.npz", **out)


if __name__ == "__main__":
    main()
