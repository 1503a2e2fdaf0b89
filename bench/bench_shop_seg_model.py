"""shop-seg network: time per image and activation memory per image (no Ray, no decode).

Random weights from :func:`vbatch.models.shop_seg.modeldir.write_random_model_dir`'s initialiser (speed and memory do
not depend on the values). Memory is measured two ways:

* ``live``: the peak of bytes held by live tensors created during the forward (a dispatch-mode
  tracker; works on CPU, close to what the CUDA caching allocator needs minus fragmentation);
* on CUDA also ``torch.cuda.max_memory_allocated`` growth over the weights.

Per-image figures are the growth from batch 1 to the largest batch, divided by the extra images.

    python bench/bench_shop_seg_model.py [--config full|tiny] [--device cpu|cuda] [--precision fp32 bf16]
        [--batch 1 2] [--repeat 1]
"""

from __future__ import annotations

import argparse
import contextlib
import time
import weakref
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from vbatch.models.shop_seg import FULL, TINY, ShopSegNet, activation_bytes_per_image
from vbatch.models.shop_seg.modeldir import randomize_
from vbatch.models.shop_seg.transforms import ShopSegTransforms


class LiveBytes(TorchDispatchMode):
    """Tracks bytes of storages created by ops while they are referenced; keeps the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # data_ptr -> [nbytes, referencing tensors]
        self.now = 0
        self.peak = 0

    def _release(self, ptr: int) -> None:
        entry = self.live.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                ptr, nbytes = st.data_ptr(), st.nbytes()
                if ptr == 0:
                    continue
                if ptr in self.live:
                    self.live[ptr][1] += 1
                else:
                    self.live[ptr] = [nbytes, 1]
                    self.now += nbytes
                    self.peak = max(self.peak, self.now)
                weakref.finalize(t, self._release, ptr)
        return out


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    if precision == "fp32":
        yield
    else:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        with torch.autocast(device.type, dtype=dtype):
            yield


def run(
    model: ShopSegNet, batch: int, device: torch.device, precision: str, repeat: int
) -> dict[str, float]:
    s = model.config.image_size
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (s * 3 // 4, s, 3), dtype=np.uint8)
    x = torch.from_numpy(np.stack([ShopSegTransforms(s).preprocess(image)] * batch)).to(device)
    with torch.inference_mode(), autocast(device, precision):
        tracker = LiveBytes()
        with tracker:
            model.segment(model(model.normalize(x)))
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            model.segment(model(model.normalize(x))).cpu()
            times.append(time.perf_counter() - t0)
        out = {"live_peak": tracker.peak, "s_per_image": min(times) / batch}
        if device.type == "cuda":
            out["cuda_peak"] = torch.cuda.max_memory_allocated() - base
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", choices=["full", "tiny"], default="full")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", nargs="+", default=["fp32"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    config = FULL if args.config == "full" else TINY
    device = torch.device(args.device)
    model = randomize_(ShopSegNet(config)).eval()
    tokens = torch.zeros(2, config.prompt_length, dtype=torch.long)
    tokens[:, 0], tokens[:, 1], tokens[:, 2] = (
        config.vocab_size - 2,
        torch.tensor([3326, 1484]),
        config.vocab_size - 1,
    )
    model.set_prompts(tokens)
    model.to(device)
    for precision in args.precision:
        rows = {b: run(model, b, device, precision, args.repeat) for b in args.batch}
        lo, hi = min(rows), max(rows)
        print(f"{args.config} {config.image_size}² {device.type} {precision}")
        for b, r in rows.items():
            extra = f"  cuda peak {r['cuda_peak'] / 1e6:.1f} MB" if "cuda_peak" in r else ""
            print(
                f"  batch {b}: {r['s_per_image']:.3f} s/image  live peak {r['live_peak'] / 1e6:.1f} MB{extra}"
            )
        if hi > lo:
            for key in ("live_peak", "cuda_peak"):
                if key in rows[hi]:
                    per = (rows[hi][key] - rows[lo][key]) / (hi - lo)
                    print(f"  per image ({key}): {per / 1e6:.1f} MB")
        print(
            f"  activation_bytes_per_image estimate: {activation_bytes_per_image(config, precision) / 1e6:.1f} MB"
        )


if __name__ == "__main__":
    main()
