"""``vbatch report --compare OTHER_OUT``: two runs of the same manifest side by side.

Rows are joined on the 64-bit hash of their id (:func:`vbatch.jobs.report.data.id_key`). The
section shows each metric's mean over the images both runs scored and its change, and the images
whose outputs changed most: candidates by the change of their foreground ratio (a column every
mask run has, so no product is opened for the ranking), then measured on the products
themselves (mean absolute difference of the masks, in grey levels).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from vbatch.jobs.report import page
from vbatch.jobs.report.data import RunData, load_run, read_rows
from vbatch.jobs.report.plots import METRIC_LABELS
from vbatch.jobs.report.visuals import encode_jpeg, grey_to_rgb, read_grey, resize
from vbatch.operators.quality import HIGHER_IS_BETTER
from vbatch.operators.storage import Storage, join, normalize

logger = logging.getLogger(__name__)

#: images shown as "changed most"; candidates measured: CANDIDATES × that
CHANGED = 8
CANDIDATES = 3


def joined(a: RunData, b: RunData) -> tuple[np.ndarray, np.ndarray]:
    """Positions (in ``a``, in ``b``) of the ids both runs processed ok."""
    ia = np.flatnonzero(a.light.ok)
    ib = np.flatnonzero(b.light.ok)
    _, xa, xb = np.intersect1d(a.light.key[ia], b.light.key[ib], return_indices=True)
    return ia[xa], ib[xb]


def metric_deltas(a: RunData, b: RunData, pa_: np.ndarray, pb: np.ndarray) -> list[dict[str, Any]]:
    """Per metric: images both runs scored, mean in each run, and the change (other → this)."""
    out = []
    for name in HIGHER_IS_BETTER:
        va, vb = a.light.numeric.get(name), b.light.numeric.get(name)
        if va is None or vb is None:
            continue
        x, y = va[pa_], vb[pb]
        both = np.isfinite(x) & np.isfinite(y)
        if not both.any():
            continue
        mean_a, mean_b = float(x[both].mean()), float(y[both].mean())
        delta = mean_a - mean_b
        better = (delta > 0) == HIGHER_IS_BETTER[name] if delta else None
        out.append(
            {
                "metric": name,
                "images": int(both.sum()),
                "this": mean_a,
                "other": mean_b,
                "delta": delta,
                "better": better,
            }
        )
    return out


def _mask_diff(
    ra: dict[str, Any], rb: dict[str, Any], storage: Storage
) -> tuple[float, np.ndarray, np.ndarray] | None:
    key = "mask_uri" if ra.get("mask_uri") else "matte_uri"
    if not ra.get(key) or not rb.get(key):
        return None
    try:
        ma = read_grey(storage.read_bytes(ra[key]))
        mb = resize(read_grey(storage.read_bytes(rb[key])), ma.shape[:2])
    except Exception as e:
        logger.warning("compare: cannot read the masks of %r: %s", ra.get("image_id"), e)
        return None
    return float(np.abs(ma.astype(np.int16) - mb.astype(np.int16)).mean()), ma, mb


def compare_section(this: RunData, other_out: str, storage: Storage, root: str, thumbs: Any) -> str:
    """The comparison's HTML section; writes its pictures under ``root/compare/``."""
    other_out = normalize(other_out)
    other = load_run(other_out, storage)
    pa_, pb = joined(this, other)
    parts = [
        f"<h2>Compared with {page.esc(other_out)}</h2>",
        page.kv_table(
            [
                (
                    "model version",
                    f"{this.record.get('model_version')} (this) · "
                    f"{other.record.get('model_version')} (other)",
                ),
                ("rows", f"{this.light.rows:,} (this) · {other.light.rows:,} (other)"),
                ("ok in both", f"{pa_.size:,}"),
            ]
        ),
    ]
    deltas = metric_deltas(this, other, pa_, pb)
    if deltas:
        rows = []
        for d in deltas:
            arrow = "" if d["better"] is None else ("better" if d["better"] else "worse")
            rows.append(
                (
                    METRIC_LABELS.get(d["metric"], d["metric"]),
                    d["images"],
                    d["this"],
                    d["other"],
                    d["delta"],
                    arrow,
                )
            )
        parts.append(
            "<h3>Metrics on the images both runs scored</h3>"
            + page.table(
                ("metric", "images", "this run", "other run", "change", ""),
                rows,
                numeric=(1, 2, 3, 4),
            )
        )
    fa = this.light.numeric.get("foreground_ratio")
    fb = other.light.numeric.get("foreground_ratio")
    if pa_.size:
        if fa is not None and fb is not None:
            change = np.nan_to_num(np.abs(fa[pa_] - fb[pb]), nan=-1.0)
            order = np.argsort(-change, kind="stable")[: CHANGED * CANDIDATES]
        else:
            order = np.argsort(this.light.key[pa_], kind="stable")[: CHANGED * CANDIDATES]
        rows_a, _ = read_rows(this.files, storage, this.light, pa_[order].tolist())
        rows_b, _ = read_rows(other.files, storage, other.light, pb[order].tolist())
        measured = []
        for i in order.tolist():
            ra, rb = rows_a[int(pa_[i])], rows_b[int(pb[i])]
            diff = _mask_diff(ra, rb, storage)
            if diff is not None:
                measured.append((diff[0], ra, diff[1], diff[2]))
        measured.sort(key=lambda m: -m[0])
        cards = []
        for k, (value, ra, ma, mb) in enumerate(measured[:CHANGED]):
            pics = []
            for tag, m in (
                ("this run", ma),
                ("other run", mb),
                (
                    "|difference|",
                    np.abs(ma.astype(np.int16) - mb.astype(np.int16)).astype(np.uint8),
                ),
            ):
                name = f"compare/{k:03d}-{tag.strip('|').split()[0]}.jpg"
                storage.write_bytes(join(root, name), encode_jpeg(grey_to_rgb(m)), "image/jpeg")
                pics.append((name, tag, int(m.shape[1]), int(m.shape[0])))
            meta = (
                f"<b>{page.esc(ra.get('image_id'))}</b> · mean |difference| {value:.1f} grey levels"
                f' · <span class="muted">{page.esc(ra.get("uri"))}</span>'
            )
            cards.append(page.card(pics, meta))
        if cards:
            parts.append("<h3>Images whose outputs changed most</h3>" + "".join(cards))
        else:
            parts.append("<p>No products to compare (no masks or mattes in both runs).</p>")
    return "".join(parts)
