"""``vbatch demo``: the whole pipeline on generated data, locally, in about a minute.

No model weights can be downloaded here, so the demo writes model directories in ModelScope's
exact layout with RANDOM weights. The masks it produces show that decoding, the actor pools, the
error accounting and the outputs work — not what a trained model would see.
"""

from __future__ import annotations

import logging
from pathlib import Path

from jobs.demo_data import write_demo_images
from jobs.segment import SegmentConfig, run_segment

logger = logging.getLogger(__name__)

_BANNER = "=" * 78


def _say(*lines: str) -> None:
    print("\n".join(lines), flush=True)


def run_demo(out: str | Path, num_images: int = 24, address: str | None = None) -> int:
    """Generate the demo data and models under ``out`` and run every job on them."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    manifest = write_demo_images(data, num_images)
    _say(
        _BANNER,
        f"vbatch demo in {out}",
        f"  {len(manifest)} manifest rows: {num_images} generated images, plus 1 corrupt file and 1 missing",
        "  file (to show error rows): " + str(data / "manifest.parquet"),
        "  NOTE: the models below have RANDOM weights (nothing can be downloaded here); their",
        "  outputs prove the pipeline, not the model. Point --model-dir at a real ModelScope",
        "  model directory for real masks.",
        _BANNER,
    )

    from models.salient import write_random_model_dir as salient_dir

    model_dir = salient_dir(out / "models" / "salient")
    _say(f"[salient] random-weight ModelScope model directory: {model_dir}")
    summary = run_segment(
        SegmentConfig(
            task="salient",
            manifest=str(data / "manifest.parquet"),
            model_dir=str(model_dir),
            out=str(out / "salient"),
            address=address,
        )
    )
    _say(summary.report(), f"masks: {out / 'salient' / 'masks'}", "")

    _say(
        _BANNER,
        "Look at the results, e.g.:",
        f"  python -c \"import pandas as pd; print(pd.read_parquet('{out / 'salient' / 'results'}'))\"",
        f"  duckdb -c \"select status, count(*) from '{out / 'salient' / 'results'}/*.parquet' group by 1\"",
        _BANNER,
    )
    return 0
