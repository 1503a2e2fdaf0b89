"""Hand-made finished runs for the report tests: inputs, products, a committed results table and
run.json, written the way the jobs publish them (no Ray)."""

from __future__ import annotations

import io
import json
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vbatch.jobs.demo_data import encode, product_image
from vbatch.operators.storage import Storage, join
from vbatch.schemas.images import image_results_schema, metric_fields

RUN_ID = "20261130T010000Z-abcdef"


def ellipse_mask(h: int, w: int, scale: float) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    if scale > 0:
        axes = (max(1, int(w * scale / 2)), max(1, int(h * scale / 2)))
        cv2.ellipse(m, (w // 2, h // 2), axes, 0, 0, 360, 255, -1)
    return m


def write_table(storage: Storage, out: str, table: pa.Table, files: int = 1) -> None:
    """Commit ``table`` as the run's results generation (split in ``files`` Parquet files)."""
    gen = join(out, "results", RUN_ID)
    names = []
    step = -(-table.num_rows // files)
    for i in range(files):
        buf = io.BytesIO()
        pq.write_table(table.slice(i * step, step), buf, row_group_size=max(1, step // 2))
        name = f"part-{i:03d}.parquet"
        storage.write_bytes(join(gen, name), buf.getvalue())
        names.append(name)
    storage.write_bytes(
        join(gen, "_SUCCESS"),
        json.dumps({"run_id": RUN_ID, "files": names, "rows": table.num_rows}).encode(),
    )
    storage.write_bytes(join(out, "_LATEST"), f"results/{RUN_ID}".encode())


def make_run(
    storage: Storage,
    root: str,
    task: str = "salient",
    n: int = 12,
    gt: bool = False,
    scale_shift: float = 0.0,
    out_name: str = "run",
) -> tuple[str, list[dict[str, Any]]]:
    """A finished ``segment`` run of ``n`` images plus two error rows under ``root/out_name``.

    Mask i covers an ellipse of scale ``(i / n + scale_shift)``; with ``gt`` every ok row names a
    ground truth (the ellipse at scale i / n) and one names a missing file.

    Returns:
        (out URI, result rows).
    """
    out = join(root, out_name)
    rows: list[dict[str, Any]] = []
    output = "rgba" if task == "matting" else "mask"
    for i in range(n):
        h, w = 40 + 4 * i, 60 + 2 * i
        image_id = f"img-{i:03d}"
        uri = f"imgs/{image_id}.jpg"
        storage.write_bytes(join(root, uri), encode(product_image(i, (w, h))))
        mask = ellipse_mask(h, w, min(1.0, i / n + scale_shift))
        row: dict[str, Any] = {
            "image_id": image_id, "uri": uri, "task": task, "status": "ok", "error": None,
            "error_class": None, "width": w, "height": h, "model_version": "v1",
            "foreground_ratio": float(mask.mean() / 255),
        }  # fmt: skip
        if output == "mask":
            row["mask_uri"] = join(out, "masks", image_id + ".png")
            storage.write_bytes(row["mask_uri"], cv2.imencode(".png", mask)[1].tobytes())
        else:
            rgba = np.dstack([product_image(i, (w, h)), mask])
            row["matte_uri"] = join(out, "mattes", image_id + ".png")
            row["cutout_uri"] = join(out, "cutouts", image_id + ".png")
            storage.write_bytes(row["matte_uri"], cv2.imencode(".png", mask)[1].tobytes())
            bgra = cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA)
            storage.write_bytes(row["cutout_uri"], cv2.imencode(".png", bgra)[1].tobytes())
        if gt:
            from vbatch.operators.quality import METRICS, metric_kind

            truth = ellipse_mask(h, w, i / n)
            row["gt_mask_uri"] = f"gt/{image_id}.png" if i else "gt/missing.png"
            if i:
                storage.write_bytes(
                    join(root, row["gt_mask_uri"]), cv2.imencode(".png", truth)[1].tobytes()
                )
                row.update(METRICS[str(metric_kind(task))](mask, truth))
                row["gt_error"] = None
            else:
                row["gt_error"] = "ground truth: object not found: …/gt/missing.png"
        rows.append(row)
    rows.append({"image_id": "broken", "uri": "imgs/broken.jpg", "task": task, "status": "error",
                 "error": "cannot decode: corrupt or truncated", "error_class": "decode"})  # fmt: skip
    storage.write_bytes(join(root, "imgs/broken.jpg"), b"\xff\xd8 not really")
    rows.append({"image_id": "gone", "uri": "imgs/gone.jpg", "task": task, "status": "error",
                 "error": "object not found: imgs/gone.jpg", "error_class": "not_found"})  # fmt: skip
    schema = image_results_schema(output)
    if gt:
        from vbatch.operators.quality import metric_kind

        schema = pa.schema(
            [*schema, *metric_fields(metric_kind(task)), pa.field("gt_mask_uri", pa.string())]
        )
    table = pa.Table.from_pylist(
        [{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema
    )
    write_table(storage, out, table, files=2)
    record = {
        "command": "segment", "run_id": RUN_ID, "status": "ok", "exit_code": 0, "rows": len(rows),
        "task": task, "model_version": "v1", "images_per_second": 12.5, "seconds": 1.2,
        "by_error_class": {"decode": 1, "not_found": 1},
        "config": {"task": task, "manifest": join(root, "manifest.parquet")},
        "manifest_files": [join(root, "manifest.parquet")],
    }  # fmt: skip
    storage.write_bytes(join(out, "run.json"), json.dumps(record).encode())
    return out, rows
