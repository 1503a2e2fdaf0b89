"""shop-seg reference outputs from ModelScope 1.40.2 (run with the oracle's Python, never imported by vbatch).

python shop_seg_ref.py tokens OUT
    OUT/bpe_simple_vocab_16e6.txt.gz (clip-anytorch's copy of CLIP's vocabulary) and OUT/tokens.npz:
    ModelScope's ``tokenize(SimpleTokenizer, text, 22, truncate=True)`` for the prompts and a few
    other strings.
python shop_seg_ref.py model OUT [SEED]
    OUT/model: a ModelScope shop-seg directory (``SHOPSEG`` with EVERY parameter and buffer random,
    the vocabulary, configuration.json); OUT/ref.npz: for a few synthetic photos of different sizes
    and aspect ratios, the pipeline's masks, and the network's input tensor and logits caught by
    forward hooks during the same pipeline calls (ShopSegmentation.forward itself is broken; the
    pipeline's preprocess → inference → postprocess path is what runs).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("USE_TF", "0")

import numpy as np
import torch

VOCAB = "bpe_simple_vocab_16e6.txt.gz"
TOKEN_TEXTS = [
    "others",
    "foregeound",
    "foreground",
    "a photo of a red shoe.",
    "  Hello,\tWORLD!! it's 2024 ",
    "caf\u00e9 na\u00efve &amp; co",
    "x" * 80,
]
IMAGE_SIZES = [(480, 640), (1300, 900), (257, 200)]


def clip_vocab() -> Path:
    """clip-anytorch's copy (found, not imported: its import needs pkg_resources)."""
    import importlib.util

    spec = importlib.util.find_spec("clip")
    assert spec is not None and spec.submodule_search_locations, "clip-anytorch is not installed"
    return Path(next(iter(spec.submodule_search_locations))) / VOCAB


def dump_tokens(out: Path) -> None:
    from modelscope.models.cv.shop_segmentation.utils import SimpleTokenizer, tokenize

    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(clip_vocab(), out / VOCAB)
    tok = SimpleTokenizer(str(out / VOCAB))
    ids = np.stack([tokenize(tok, t, 22, True)[0].numpy() for t in TOKEN_TEXTS])
    np.savez(out / "tokens.npz", ids=ids, texts=np.array(TOKEN_TEXTS))


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter and buffer random; std 1/sqrt(fan_in) weights keep 12-block activations sane."""
    g = torch.Generator().manual_seed(seed)
    norms = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.BatchNorm2d)
    for mod in model.modules():
        for name, p in mod.named_parameters(recurse=False):
            r = torch.randn(p.shape, generator=g)
            if isinstance(mod, norms):
                p.copy_(1 + 0.1 * r if name == "weight" else 0.05 * r)
            elif "bias" in name:
                p.copy_(0.05 * r)
            elif isinstance(mod, torch.nn.Embedding):
                p.copy_(0.5 * r)
            elif name in ("proj", "text_projection"):
                p.copy_(r / math.sqrt(p.shape[0]))
            elif p.dim() >= 2 and "weight" in name:  # Linear/Conv (out first); MHA in_proj_weight
                p.copy_(r / math.sqrt(p[0].numel()))
            else:  # class/positional embeddings, contexts, gamma
                p.copy_(0.5 * r)
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.copy_(0.1 * torch.randn(mod.running_mean.shape, generator=g))
            mod.running_var.copy_(0.5 + torch.rand(mod.running_var.shape, generator=g))
            mod.num_batches_tracked.fill_(int(torch.randint(1, 10_000, (1,), generator=g)))
    named = dict(model.named_parameters()) | dict(model.named_buffers())
    assert all(t.numel() == 0 or t.abs().sum() > 0 for t in named.values()), "a tensor stayed zero"


def synthetic_photo(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth 'product shot': gradient background, a few soft-edged coloured shapes, mild noise."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy /= h
    xx /= w
    c0, c1 = rng.uniform(60, 230, 3), rng.uniform(60, 230, 3)
    img = c0 * (1 - yy[..., None]) + c1 * yy[..., None] + 20 * np.sin(3 * xx)[..., None]
    for _ in range(4):
        cy, cx = rng.uniform(0.2, 0.8, 2)
        ry, rx = rng.uniform(0.08, 0.3, 2)
        d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        alpha = np.clip((1.1 - d) * 6, 0, 1)[..., None]
        color = rng.uniform(0, 255, 3) + 30 * np.cos(6 * yy + 4 * xx)[..., None]
        img = img * (1 - alpha) + color * alpha
    img += rng.normal(0, 3, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def dump_model(out: Path, seed: int) -> None:
    from modelscope.models.cv.shop_segmentation.shop_seg_base import SHOPSEG
    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks
    from PIL import Image

    torch.manual_seed(seed)
    model_dir = out / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(clip_vocab(), model_dir / VOCAB)
    net = SHOPSEG(model_dir=str(model_dir))
    randomize(net, seed)
    torch.save(net.state_dict(), model_dir / "pytorch_model.bin")
    del net
    config = {
        "framework": "pytorch",
        "task": Tasks.shop_segmentation,
        "model": {"type": "shop-segmentation"},
        "pipeline": {"type": "shop-segmentation"},
    }
    (model_dir / "configuration.json").write_text(json.dumps(config, indent=4))

    pipe = pipeline(Tasks.shop_segmentation, model=str(model_dir), device="cpu")
    caught: dict[str, torch.Tensor] = {}
    pipe.model.model.register_forward_hook(
        lambda _m, args, output: caught.update(
            input=args[0].detach().clone(), logits=output.detach().clone()
        )
    )
    rng = np.random.default_rng(seed)
    result: dict[str, np.ndarray] = {}
    for i, (h, w) in enumerate(IMAGE_SIZES):
        img = synthetic_photo(h, w, rng)
        mask = pipe(Image.fromarray(img))["masks"]
        result[f"image{i}"] = img
        result[f"mask{i}"] = np.asarray(mask)
        result[f"logits{i}"] = caught["logits"].numpy()
        if i == 0:
            result["input0"] = caught["input"].numpy()
        print(f"image {i} {h}x{w}: foreground {np.mean(result[f'mask{i}'] > 0):.3f}")
    np.savez(out / "ref.npz", **result)


def main() -> None:
    # MODE[,MODE…]: several cases in one process (modelscope's import costs seconds a process)
    modes, out = sys.argv[1].split(","), Path(sys.argv[2])
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    for mode in modes:
        if mode == "tokens":
            dump_tokens(out)
        elif mode == "model":
            dump_model(out, int(sys.argv[3]) if len(sys.argv) > 3 else 0)
        else:
            raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
