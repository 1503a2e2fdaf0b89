"""``vbatch demo``: every job on generated data, locally, in a few minutes.

No model weights can be downloaded here, so the demo writes model directories in ModelScope's
exact layout with RANDOM weights. The products show that decoding, the actor pools, the error
accounting and the outputs work — not what a trained model would see.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from vbatch.jobs.backfill import worst_exit
from vbatch.jobs.demo_data import encode, person_crop, write_demo_images
from vbatch.jobs.segment import ImageJobConfig, run_image_job
from vbatch.operators.storage import Storage

logger = logging.getLogger(__name__)

_BANNER = "=" * 78


def _say(*lines: str) -> None:
    print("\n".join(lines), flush=True)


def _report(out: Path, reports: list[str]) -> None:
    """The run's visual report, as every job command writes it (a failure is only a warning);
    its path is appended to ``reports``."""
    from vbatch.jobs.report import build_report

    try:
        reports.append(build_report(str(out), Storage()).index_uri)
    except Exception as e:
        logger.warning("report of %s failed: %s: %s", out, type(e).__name__, e)


#: the demo manifest's deliberately broken rows (a corrupt file and a missing one)
DELIBERATE_ERRORS = 2


def _segment(
    task: str,
    model_dir: Path,
    data: Path,
    out: Path,
    address: str | None,
    reports: list[str],
    max_error_rate: float,
    **kw: object,
) -> int:
    summary = run_image_job(
        ImageJobConfig(
            task=task,
            manifest=str(data / "manifest.parquet"),
            model_dir=str(model_dir),
            out=str(out / task),
            address=address,
            max_error_rate=max_error_rate,
            **kw,  # type: ignore[arg-type]
        )
    )
    _say(summary.report(), "")
    _report(out / task, reports)
    return summary.exit_code


def _people(folder: Path, n: int) -> Path:
    """Person crops of n // 4 identities seen by 2 cameras; manifest with person_id and camera_id."""
    (folder / "crops").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        pid, cam = i // 4 + 1, i % 2 + 1
        name = f"p{pid:03d}_c{cam}_{i:04d}.jpg"
        (folder / "crops" / name).write_bytes(encode(person_crop(i, pid), quality=92))
        rows.append(
            {"image_id": name[:-4], "uri": f"crops/{name}", "person_id": pid, "camera_id": cam}
        )
    pq.write_table(pa.Table.from_pylist(rows), folder / "manifest.parquet")
    return folder / "manifest.parquet"


def run_demo(out: str | Path, num_images: int = 24, address: str | None = None) -> int:
    """Generate the demo data and models under ``out`` and run every job on them.

    Returns:
        The worst exit code of the jobs (0 when everything but the deliberately broken rows
        worked).
    """
    from vbatch.models.matting.modeldir import write_random_model_dir as matting_dir
    from vbatch.models.reid.modeldir import write_random_model_dir as reid_dir
    from vbatch.models.salient.modeldir import write_random_model_dir as salient_dir
    from vbatch.models.shop_seg import TINY as SHOP_TINY
    from vbatch.models.shop_seg.modeldir import write_random_model_dir as shop_dir

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    reports: list[str] = []
    data = out / "data"
    manifest = write_demo_images(data, num_images)
    _say(
        _BANNER,
        f"vbatch demo in {out}",
        f"  {len(manifest)} manifest rows: {num_images} generated images, plus 1 corrupt file and 1 missing",
        f"  file (to show error rows): {data / 'manifest.parquet'}",
        "  NOTE: the models below have RANDOM weights (nothing can be downloaded here): their",
        "  outputs prove the pipeline, not the model. Point --model-dir at a real ModelScope",
        "  model directory for real masks.",
        _BANNER,
    )
    models = out / "models"
    # the deliberately broken rows are expected: the jobs exit 0 with them, and 3 (too many error
    # rows) only if anything else fails
    rate = DELIBERATE_ERRORS / len(manifest)
    codes = []

    m = salient_dir(models / "salient")
    _say(f"[salient] SENet, full size, random weights: {m}")
    codes.append(_segment("salient", m, data, out, address, reports, rate))

    m = shop_dir(models / "shop-seg", config=SHOP_TINY)
    _say(
        f"[shop-seg] DenseCLIP, TINY configuration of the same code (the full one takes seconds per image on CPU): {m}"
    )
    codes.append(_segment("shop-seg", m, data, out, address, reports, rate))

    m = matting_dir(models / "matting")
    _say(f"[matting] a small generated ONNX graph with the real one's inputs and outputs: {m}")
    codes.append(_segment("matting", m, data, out, address, reports, rate, background="#2a6fdb"))

    from vbatch.jobs.publish import read_table
    from vbatch.jobs.reid import queries_from_table, run_embed, search_table
    from vbatch.operators.index import GalleryIndex, build_index

    people = _people(out / "people", 16)
    m = reid_dir(models / "reid")
    _say(f"[reid] PASS ViT-B/16, full size, random weights: {m}")
    summary = run_embed(
        ImageJobConfig(
            "reid", str(people), str(m), str(out / "reid" / "embeddings"), address=address
        )
    )
    _say(summary.report())
    codes.append(summary.exit_code)
    _report(out / "reid" / "embeddings", reports)
    storage = Storage()
    info = build_index(str(out / "reid" / "embeddings"), str(out / "reid" / "index"), storage)
    _say(f"index: {info.factory}, {info.count} vectors at {out / 'reid' / 'index'}")
    _report(out / "reid" / "index", reports)
    queries = queries_from_table(read_table(str(out / "reid" / "embeddings"), storage).slice(0, 2))
    hits = search_table(GalleryIndex.open(str(out / "reid" / "index"), storage), queries, k=3)
    table = hits.to_pandas().to_string(index=False)
    _say("search (first two crops as queries, top 3):", table, "")

    from vbatch.jobs.demo_data import write_demo_clip
    from vbatch.jobs.video import VideoConfig, run_video
    from vbatch.models.rvos import TINY as RVOS_TINY
    from vbatch.models.rvos.modeldir import write_random_model_dir as rvos_dir

    clip = write_demo_clip(out / "video" / "clip.mp4")
    pq.write_table(
        pa.table(
            {
                "video_id": ["clip"],
                "uri": ["clip.mp4"],
                "queries": [["a red ball rolling", "the green box"]],
            }
        ),
        out / "video" / "manifest.parquet",
    )
    m = rvos_dir(models / "rvos", config=RVOS_TINY)
    _say(f"[rvos] MTTR, TINY configuration of the same code, on a generated 3 s clip {clip}: {m}")
    video = run_video(
        VideoConfig(
            str(out / "video" / "manifest.parquet"),
            str(m),
            str(out / "rvos"),
            render=True,
            address=address,
        )
    )
    _say(video.report(), "")
    codes.append(video.exit_code)
    _report(out / "rvos", reports)

    _say(
        _BANNER,
        "Outputs:",
        "  (each run's products live in <out>/products/<run id>/; a result row's mask_uri,",
        "  matte_uri, cutout_uri names its own)",
        f"  masks       {out / 'salient' / 'products'}   {out / 'shop-seg' / 'products'}",
        f"  mattes, cut-outs, composites  {out / 'matting' / 'products'}",
        f"  embeddings  {out / 'reid' / 'embeddings' / 'results'}   index {out / 'reid' / 'index'}",
        f"  video masks {out / 'rvos' / 'products'}   overlay {out / 'rvos' / 'renders'}",
        "Look at a results table, e.g.:",
        f"  python -c \"import pandas as pd; print(pd.read_parquet('{out / 'salient' / 'results'}'))\"",
        f"  duckdb -c \"select status, count(*) from '{out / 'salient' / 'results'}/*/*.parquet' group by 1\"",
        "Reports (open in a browser):",
        *(f"  {uri}" for uri in reports),
        _BANNER,
    )
    return worst_exit(codes)
