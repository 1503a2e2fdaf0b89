"""Build ``<out>/report/``: one self-contained folder (``index.html``, ``thumbs/``, ``plots/``)
from what a finished run left on storage (its results table, ``run.json``, its products and the
inputs the rows name), locally or on S3.

The report reads the results' light columns once and opens only a bounded set of rows and images
(the sample, the extremes, error examples): its cost does not grow with the run beyond one flat
pass over a few columns (:mod:`vbatch.jobs.report.data`). ``index.html`` is written last: a
report folder with an ``index.html`` is complete.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from vbatch.jobs.report import page
from vbatch.jobs.report.data import (
    Light,
    RunData,
    extreme_positions,
    load_run,
    read_rows,
    sample_positions,
)
from vbatch.jobs.report.plots import METRIC_LABELS, distribution_plots
from vbatch.jobs.report.visuals import encode_jpeg, row_panels
from vbatch.operators.quality import HIGHER_IS_BETTER
from vbatch.operators.storage import Storage, join, normalize

logger = logging.getLogger(__name__)

#: rows in the contact sheet unless --report-samples says otherwise
DEFAULT_SAMPLES = 48
#: rows per "worth a look" list
EXTREMES = 6
#: threads reading images and products (I/O bound)
IO_THREADS = 8
REPORT = "report"
#: the metric whose worst images are worth a look, per task: the structure measure for saliency,
#: IoU for product masks, SAD for mattes
PRIMARY_METRICS = ("gt_smeasure", "gt_iou", "gt_sad")


@dataclass
class ReportInfo:
    """Where the report is and what building it cost."""

    index_uri: str
    rows: int
    #: compressed Parquet column chunks read (from the files' footers)
    parquet_bytes: int
    #: rows whose images and products were opened
    rows_opened: int
    seconds: float


class _Thumbs:
    """Writes each shown row's pictures once, under ``thumbs/``, and remembers their cards."""

    def __init__(self, root: str, storage: Storage, task: str | None, base_uri: str) -> None:
        self.root, self.storage, self.task, self.base_uri = root, storage, task, base_uri
        self.pictures: dict[int, tuple[list[tuple[str, str, int, int]], list[str]]] = {}

    def render(self, rows: dict[int, dict[str, Any]]) -> None:
        todo = [p for p in rows if p not in self.pictures]

        def one(p: int) -> tuple[int, list[tuple[str, str, int, int]], list[str]]:
            row = rows[p]
            panels, notes = row_panels(
                row, row.get("task") or self.task, self.storage, self.base_uri
            )
            pics = []
            for k, (caption, rgb) in enumerate(panels):
                name = f"thumbs/{p:09d}-{k}.jpg"
                self.storage.write_bytes(join(self.root, name), encode_jpeg(rgb), "image/jpeg")
                pics.append((name, caption, int(rgb.shape[1]), int(rgb.shape[0])))
            return p, pics, notes

        with ThreadPoolExecutor(IO_THREADS) as pool:
            for p, pics, notes in pool.map(one, todo):
                self.pictures[p] = (pics, notes)

    def card(self, p: int, row: dict[str, Any], extra: str = "") -> str:
        pics, notes = self.pictures.get(p, ([], []))
        facts = [f"<b>{page.esc(row.get('image_id') or row.get('video_id'))}</b>"]
        if row.get("width") and row.get("height"):
            facts.append(f"{row['width']}×{row['height']}")
        if row.get("foreground_ratio") is not None:
            facts.append(f"fg {row['foreground_ratio']:.3f}")
        for name in HIGHER_IS_BETTER:
            if row.get(name) is not None:
                facts.append(f"{name[3:]} {row[name]:.4g}")
        if row.get("error"):
            cls = row.get("error_class")
            label = f'<span class="status-bad">{page.esc(cls)}</span>: ' if cls else ""
            facts.append(label + page.esc(row["error"]))

        if row.get("gt_error"):
            facts.append(f'<span class="note">{page.esc(row["gt_error"])}</span>')
        facts += [f'<span class="note">{page.esc(n)}</span>' for n in notes]
        if row.get("uri"):
            facts.append(f'<span class="muted">{page.esc(row["uri"])}</span>')
        return page.card(pics, " · ".join(facts) + extra)


def _glance(run: RunData) -> str:
    rec, light = run.record, run.light
    ok = int(light.ok.sum())
    status = rec.get("status")
    cls = "status-ok" if status == "ok" else "status-bad"
    pairs: list[tuple[str, Any]] = [
        (
            "exit status",
            page.Raw(
                f'<span class="{cls}">{page.esc(status or "unknown")}</span>'
                f" (exit {page.esc(rec.get('exit_code', '?'))})"
            ),
        ),
        ("rows", light.rows),
        ("ok", ok),
        ("error", light.rows - ok),
        ("error rate", f"{(light.rows - ok) / light.rows:.2%}" if light.rows else "–"),
    ]
    for key, label in (
        ("images_per_second", "throughput (images/s)"),
        ("rows_per_second", "throughput (rows/s)"),
        ("seconds", "wall time (s)"),
        ("model_version", "model version"),
        ("task", "task"),
        ("command", "command"),
        ("run_id", "run id"),
        ("started_at", "started"),
        ("ended_at", "ended"),
        ("resumed_rows", "rows resumed from a crashed attempt"),
        ("resources", "resources"),
        ("max_error_rate", "--max-error-rate"),
    ):
        if rec.get(key) is not None and not (
            key == "rows_per_second" and "images_per_second" in rec
        ):
            pairs.append((label, rec[key]))
    if rec.get("versions"):
        pairs.append(("versions", ", ".join(f"{k} {v}" for k, v in rec["versions"].items() if v)))
    if not rec:
        pairs.append(
            ("run.json", page.Raw('<span class="note">missing: counts are the table\'s</span>'))
        )
    return "<h2>The run at a glance</h2>" + page.kv_table(pairs)


def _errors(run: RunData, rows: dict[int, dict[str, Any]]) -> str:
    light = run.light
    if not light.by_error_class:
        return "<h2>Errors</h2><p>No error rows.</p>"
    body = []
    for cls, count in sorted(light.by_error_class.items(), key=lambda kv: -kv[1]):
        examples = [rows[p] for p in light.error_examples.get(cls, []) if p in rows]
        text = "<br>".join(
            f"<code>{page.esc(r.get('image_id') or r.get('video_id') or r.get('query_id'))}</code>: "
            f"{page.esc(r.get('error'))}"
            for r in examples
        )
        body.append((cls, count, page.Raw(text)))
    return "<h2>Errors by class</h2>" + page.table(
        ("error class", "rows", "examples"), body, numeric=(1,)
    )


def _metrics(run: RunData) -> str:
    light = run.light
    lines = []
    for name, label in METRIC_LABELS.items():
        v = light.numeric.get(name)
        if v is None:
            continue
        v = v[light.ok & np.isfinite(v)]
        if v.size == 0:
            continue
        lines.append(
            (label, v.size, float(v.mean()), float(np.median(v)), float(v.min()), float(v.max()))
        )
    if not lines:
        return ""
    return (
        "<h2>Quality against the ground truth</h2>"
        '<p class="muted">Per-image (per-frame for videos) metrics of the rows whose manifest row '
        "named a ground truth (<code>gt_mask_uri</code>; <code>gt_mask_dir</code> for videos); "
        "rows whose ground truth could not be used carry <code>gt_error</code> and no "
        "metrics.</p>"
        + page.table(
            ("metric", "images", "mean", "median", "min", "max"), lines, numeric=(1, 2, 3, 4, 5)
        )
    )


def choose_rows(
    light: Light, samples: int, extremes: int
) -> tuple[list[int], list[tuple[str, list[int]]], list[int]]:
    """The rows the report shows (positions into ``light``).

    Returns:
        (the contact sheet's sample, [(title, rows)] worth a look, error examples).
    """
    sample = sample_positions(light, samples)
    looks: list[tuple[str, list[int]]] = [
        (
            "Emptiest masks (lowest foreground ratio)",
            extreme_positions(light, "foreground_ratio", extremes, False),
        ),
        (
            "Fullest masks (highest foreground ratio)",
            extreme_positions(light, "foreground_ratio", extremes, True),
        ),
    ]
    width, height = light.numeric.get("width"), light.numeric.get("height")
    if width is not None and height is not None and width.size:
        pixels = Light(rows=light.rows, ok=light.ok, numeric={"pixels": width * height})
        looks.append(("Largest images", extreme_positions(pixels, "pixels", extremes, True)))
    # one list for the task's headline metric (the first present): four lists of the same
    # images help nobody
    for name in PRIMARY_METRICS:
        worst = extreme_positions(light, name, extremes, largest=not HIGHER_IS_BETTER[name])
        if worst:
            looks.append((f"Worst {METRIC_LABELS[name].split(' (')[0]}", worst))
            break
    errors = [p for ps in light.error_examples.values() for p in ps]
    return sample, looks, errors


def _looks_section(
    looks: list[tuple[str, list[int]]], errors: list[int], thumbs: Any, rows: dict[int, Any]
) -> str:
    """ "Worth a look": the extremes of each list, then the error rows."""
    look_html = ["<h2>Worth a look</h2>"]
    for title, ps in looks:
        if ps:
            look_html.append(
                f"<h3>{page.esc(title)}</h3>" + "".join(thumbs.card(p, rows[p]) for p in ps)
            )
    if errors:
        look_html.append(
            "<h3>Error rows (their inputs where they could be read)</h3>"
            + "".join(thumbs.card(p, rows[p]) for p in errors)
        )
    look_html.append(
        '<p class="muted">Lowest-confidence images: none of vbatch\'s models reports a '
        "confidence per image.</p>"
    )
    return "".join(look_html)


def _plots_section(light: Any, root: str, storage: Storage) -> str:
    """The distributions of the numeric columns over the ok rows (PNGs under ``root/plots``)."""
    plots = distribution_plots(light.numeric, light.ok)
    for name, _, png in plots:
        storage.write_bytes(join(root, "plots", name), png, "image/png")
    return (
        '<h2>Distributions (ok rows)</h2><div class="plots">'
        + "".join(
            f'<img src="plots/{page.esc(n)}" width="420" height="280" alt="{page.esc(c)}">'
            for n, c, _ in plots
        )
        + '</div><p class="muted">Per-image latency is not recorded by vbatch jobs (batches run '
        "in actor pools); the run's throughput is above.</p>"
    )


def build_report(
    out: str,
    storage: Storage,
    samples: int = DEFAULT_SAMPLES,
    compare: str | None = None,
    extremes: int = EXTREMES,
) -> ReportInfo:
    """Build (or rebuild) ``<out>/report/`` from the run at ``out``.

    Args:
        out: a finished job's ``--out`` (local or s3://).
        storage: reaches the run, its inputs and products.
        samples: rows in the contact sheet (deterministic: the smallest id hashes).
        compare: another run's ``--out`` (e.g. another model version) to put side by side.
        extremes: rows per "worth a look" list.

    Returns:
        Where ``index.html`` is and what the report cost.

    Raises:
        FileNotFoundError: ``out`` holds no results table.
    """
    t0 = time.perf_counter()
    out = normalize(out)
    if not storage.exists(join(out, "_LATEST")) and storage.exists(join(out, "index.json")):
        # a gallery index (reid index / add): its own page
        from vbatch.jobs.report.reid import build_index_report

        uri = build_index_report(out, storage, samples)
        return ReportInfo(uri, 0, 0, 0, time.perf_counter() - t0)
    run = load_run(out, storage)
    if not run.files:
        raise FileNotFoundError(f"{out}: no results table (is it a job's --out?)")
    light = run.light
    root = join(out, REPORT)
    if storage.exists(root):
        storage.delete(root, recursive=True)

    sample, looks, errors = choose_rows(light, samples, extremes)
    shown = sample + [p for _, ps in looks for p in ps] + errors
    rows, detail_bytes = read_rows(run.files, storage, light, shown)
    task = run.record.get("task")
    thumbs = _Thumbs(root, storage, task, run.base_uri)
    from vbatch.jobs.report.video import video_section

    # frames of videos: strips per video and query replace the contact sheet
    videos = video_section({p: rows[p] for p in sample}, out, root, storage, run.base_uri)
    if videos:
        sample = []
    searches = ""
    if "query_id" in light.columns and "rank" in light.columns:
        # reid search: the index and query strips replace the contact sheet
        from vbatch.jobs.report.reid import search_section

        searches, sample = search_section(run.files, run.record, root, storage, samples), []
    thumbs.render({p: rows[p] for p in [*sample, *(p for _, ps in looks for p in ps), *errors]})

    sections = [
        f"<h1>vbatch report — {page.esc(run.record.get('command', 'run'))}"
        f"{' · ' + page.esc(task) if task else ''}</h1>"
        f'<p class="muted">{page.esc(out)}</p>',
        _glance(run),
        _errors(run, rows),
        _metrics(run),
    ]
    if compare:
        from vbatch.jobs.report.compare import compare_section

        sections.append(compare_section(run, compare, storage, root, thumbs))
    if searches:
        sections.append(searches)
    if videos:
        from vbatch.jobs.report.video import jf_section

        sections.append(jf_section(run.files, storage))
        sections.append(videos)
    if not videos and not searches:
        sections.append(
            f'<h2>Contact sheet</h2><p class="muted">{len(sample)} of {int(light.ok.sum()):,} ok rows, '
            "a deterministic sample (the smallest hashes of the ids: the same rows on every rebuild; "
            "<code>--report-samples N</code>).</p>"
            + "".join(thumbs.card(p, rows[p]) for p in sample)
        )
    sections.append(_looks_section(looks, errors, thumbs, rows))
    sections.append(_plots_section(light, root, storage))
    if run.record.get("config"):
        sections.append("<h2>Configuration</h2>" + page.config_block(run.record["config"]))
    seconds = time.perf_counter() - t0
    parquet_bytes = light.bytes_read + detail_bytes
    sections.append(
        f'<p class="muted">Report built in {seconds:.1f} s from {len(run.files)} Parquet file(s): '
        f"{parquet_bytes / 1e6:.1f} MB of column chunks read, {len(rows)} rows opened.</p>"
    )
    index = join(root, "index.html")
    # text/html: served from a bucket, the page renders instead of downloading
    html_bytes = page.document(f"vbatch report {out}", sections).encode()
    storage.write_bytes(index, html_bytes, "text/html; charset=utf-8")
    return ReportInfo(index, light.rows, parquet_bytes, len(rows), seconds)
