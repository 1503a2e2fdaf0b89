"""The GPU check: everything vbatch does differently on a GPU, run once, summarised in one file.

Prepared for the first session with a GPU machine (one call of under 8 minutes): the CUDA tests,
each model's bare forward vs end-to-end rate with GPU utilisation sampled by ``nvidia-smi``,
shop-seg's memory-probed batch, every torch model at bf16/fp16 vs fp32 (speed and deviation),
faiss-gpu training and ONNX Runtime's CUDA provider. Each step runs as a subprocess with its own time limit; a failing step is recorded and
the next one runs. Writes ``gpu_check.json`` and ``gpu_check.md`` under ``--out``.

    python bench/gpu_check.py --out /tmp/gpu-check          # on the GPU machine
    python bench/gpu_check.py --dry-run                     # anywhere: what it would run
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


@dataclass
class Step:
    name: str
    cmd: list[str]
    timeout_s: int
    what: str
    status: str = "not run"
    seconds: float = 0.0
    gpu_util_mean: float | None = None
    gpu_util_max: float | None = None
    gpu_mem_max_mib: float | None = None
    output_tail: str = ""
    extra: dict = field(default_factory=dict)


def steps() -> list[Step]:
    bench = ROOT / "bench"
    probe = (
        "from vbatch.jobs.runtime import ensure_ray, decide_resources;"
        "ensure_ray();"
        "r = decide_resources('shop-seg', precision='bf16'); print('shop-seg bf16 batch', r.batch_size);"
        "r = decide_resources('shop-seg'); print('shop-seg fp32 batch', r.batch_size, r.describe())"
    )
    ort = (
        "import onnxruntime as ort, sys; p = ort.get_available_providers(); print(p);"
        "sys.exit(0 if 'CUDAExecutionProvider' in p else 1)"
    )
    seg = str(bench / "bench_segment.py")
    return [
        Step(
            "env", [PY, "-m", "vbatch.jobs.cli", "env", "--json"], 30, "versions, GPUs, providers"
        ),
        Step(
            "cuda-tests",
            [
                PY,
                "-m",
                "pytest",
                "-q",
                "-x",
                "-k",
                "cuda or gpu_decode",
                str(ROOT / "tests" / "models"),
                str(ROOT / "tests" / "test_device_decode.py"),
            ],
            75,
            "the tests that need CUDA (skipped on CPU machines)",
        ),
        Step(
            "salient-e2e",
            [PY, seg, "--task", "salient", "--images", "512", "--batch-size", "32"],
            75,
            "bare forward vs end to end, GPU",
        ),
        Step(
            "shop-seg-e2e",
            [PY, seg, "--task", "shop-seg", "--images", "96", "--batch-size", "8"],
            60,
            "bare forward vs end to end, GPU",
        ),
        Step(
            "gpu-decode",
            [
                PY,
                str(bench / "bench_cpu_stages.py"),
                "--decode",
                "gpu",
                "--actor-device",
                "cuda",
                "--tasks",
                "salient",
                "--sizes",
                "2",
                "12",
                "--repeats",
                "5",
            ],
            20,
            "--decode gpu: CPU stages and the actor's nvJPEG decode + resize",
        ),
        Step("shop-seg-probe", [PY, "-c", probe], 40, "the batch sized from free GPU memory"),
        Step(
            "autocast",
            [
                PY,
                str(bench / "bench_precision.py"),
                "--device",
                "cuda",
                "--precisions",
                "fp32",
                "bf16",
                "fp16",
                "--rounds",
                "3",
                # cheapest first: a timed-out step still keeps the models already printed
                "--models",
                "reid",
                "salient",
                "u2net",
                "rvos",
                "shop-seg",
            ],
            90,
            "every torch model at fp32/bf16/fp16: images/s and deviation from fp32",
        ),
        Step(
            "faiss-gpu",
            [
                PY,
                str(bench / "bench_index.py"),
                "--ids",
                "5000",
                "--per-id",
                "10",
                "--queries",
                "500",
            ],
            45,
            "index build with GPU training",
        ),
        Step("ort-cuda", [PY, "-c", ort], 15, "ONNX Runtime's CUDA provider is available"),
        Step(
            "matting-cuda",
            [PY, str(bench / "bench_matting_model.py"), "--device", "cuda", "--seconds", "5"],
            30,
            "the matting graph on the CUDA provider",
        ),
    ]


class GpuSampler:
    """``nvidia-smi`` every 0.5 s in the background: utilisation % and memory used."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"],
                    capture_output=True, text=True, timeout=5,
                ).stdout  # fmt: skip
                util, mem = out.splitlines()[0].split(",")
                self.samples.append((float(util), float(mem)))
            except Exception:
                pass
            self._stop.wait(0.5)

    def __enter__(self) -> GpuSampler:
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def run(step: Step) -> None:
    start = time.perf_counter()
    with GpuSampler() as gpu:
        try:
            proc = subprocess.run(
                step.cmd, cwd=ROOT, capture_output=True, text=True, timeout=step.timeout_s
            )
            step.status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
            output = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            step.status = f"timed out after {step.timeout_s} s"
            output = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    step.seconds = round(time.perf_counter() - start, 1)
    step.output_tail = output[-3000:]
    if gpu.samples:
        utils = [u for u, _ in gpu.samples]
        step.gpu_util_mean = round(sum(utils) / len(utils), 1)
        step.gpu_util_max = max(utils)
        step.gpu_mem_max_mib = max(m for _, m in gpu.samples)


def markdown(results: list[Step]) -> str:
    rows = [
        "| step | what | status | s | GPU util mean/max % | GPU mem max MiB |",
        "|---|---|---|---|---|---|",
    ]
    for s in results:
        util = "–" if s.gpu_util_mean is None else f"{s.gpu_util_mean}/{s.gpu_util_max}"
        rows.append(
            f"| {s.name} | {s.what} | {s.status} | {s.seconds} | {util} | {s.gpu_mem_max_mib or '–'} |"
        )
    tails = [f"\n### {s.name}\n```\n{s.output_tail.strip()[-1500:]}\n```" for s in results]
    return "# vbatch GPU check\n\n" + "\n".join(rows) + "\n" + "\n".join(tails) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=Path("gpu-check"), help="where the summary goes")
    ap.add_argument("--dry-run", action="store_true", help="list the steps and their commands")
    ap.add_argument("--only", nargs="+", metavar="STEP", help="run only these steps")
    args = ap.parse_args()
    plan = [s for s in steps() if not args.only or s.name in args.only]
    if args.dry_run:
        total = sum(s.timeout_s for s in plan)
        for s in plan:
            print(f"{s.name:<15} ≤{s.timeout_s:>4} s  {s.what}\n{'':<15}{' '.join(s.cmd)}")
        print(f"{len(plan)} steps, at most {total} s ({total / 60:.1f} min) in all")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for s in plan:
        print(f"== {s.name}: {s.what}", flush=True)
        run(s)
        print(f"   {s.status} in {s.seconds} s", flush=True)
        (args.out / "gpu_check.json").write_text(json.dumps([asdict(x) for x in plan], indent=2))
        (args.out / "gpu_check.md").write_text(markdown(plan))
    return 0 if all(s.status == "ok" for s in plan) else 1


if __name__ == "__main__":
    sys.exit(main())
