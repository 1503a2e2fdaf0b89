"""Distributions of a run drawn with matplotlib (Agg backend: no display, no GUI toolkit), as PNG.

Each plot is computed from the flat arrays of :class:`vbatch.jobs.report.data.Light`, so a
million rows cost a histogram, not a million points.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable

import numpy as np

logger = logging.getLogger(__name__)

#: labels of the metric columns
METRIC_LABELS = {
    "gt_mae": "MAE (lower is better)",
    "gt_max_fmeasure": "max F-measure",
    "gt_smeasure": "S-measure",
    "gt_mean_emeasure": "mean E-measure",
    "gt_iou": "IoU",
    "gt_boundary_f": "boundary F",
    "gt_sad": "SAD / 1000 (lower is better)",
    "gt_mse": "MSE (lower is better)",
    "gt_j": "region J (IoU), per frame",
    "gt_f": "boundary F, per frame",
}


def _figure() -> tuple:
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    # fixed margins: constrained layout doubles the cost of a plot and these never change
    fig = Figure(figsize=(4.2, 2.8), dpi=100)
    fig.subplots_adjust(left=0.16, right=0.95, bottom=0.17, top=0.9)
    return fig, fig.add_subplot()


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def histogram(values: np.ndarray, title: str, xlabel: str, log_x: bool = False) -> bytes:
    """PNG of a histogram of the finite ``values`` (log-spaced bins with ``log_x``)."""
    v = values[np.isfinite(values)]
    fig, ax = _figure()
    if log_x:
        v = v[v > 0]
        bins = np.geomspace(v.min(), v.max() * 1.0001, 40) if v.size and v.max() > v.min() else 20
        ax.set_xscale("log")
    else:
        bins = 40
    ax.hist(v, bins=bins, color="#3b6fb6")
    ax.set_title(f"{title} (n={v.size:,})", fontsize=10)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel("images", fontsize=9)
    ax.tick_params(labelsize=8)
    return _png(fig)


def size_plot(width: np.ndarray, height: np.ndarray) -> bytes:
    """PNG of image sizes: a 2-D histogram of width × height (log-scaled counts)."""
    from matplotlib.colors import LogNorm

    ok = np.isfinite(width) & np.isfinite(height)
    w, h = width[ok], height[ok]
    fig, ax = _figure()
    if w.size:
        hist = ax.hist2d(w, h, bins=40, cmap="viridis", norm=LogNorm(), cmin=1)
        fig.colorbar(hist[3], ax=ax).ax.tick_params(labelsize=7)
    ax.set_title(f"image sizes (n={w.size:,})", fontsize=10)
    ax.set_xlabel("width (px)", fontsize=9)
    ax.set_ylabel("height (px)", fontsize=9)
    ax.tick_params(labelsize=8)
    return _png(fig)


def distribution_plots(
    numeric: dict[str, np.ndarray], ok: np.ndarray
) -> list[tuple[str, str, bytes]]:
    """Every plot the data allows: ``[(file name, caption, PNG bytes)]``.

    Args:
        numeric: the light numeric columns (NaN where absent).
        ok: the ok rows (distributions are of ok rows only).
    """
    plots: list[tuple[str, str, bytes]] = []

    def has(name: str) -> bool:
        return name in numeric and bool(np.isfinite(numeric[name][ok]).any())

    def add(name: str, caption: str, draw: Callable[[], bytes]) -> None:
        try:
            plots.append((name, caption, draw()))
        except Exception:  # a plot is never worth failing the report for
            logger.warning("plot %s failed", name, exc_info=True)

    if has("foreground_ratio"):
        fg = numeric["foreground_ratio"][ok]
        add(
            "foreground_ratio.png",
            "foreground ratio",
            lambda: histogram(fg, "foreground ratio", "mean of the mask / 255"),
        )
        if has("width") and has("height"):
            area = fg * numeric["width"][ok] * numeric["height"][ok]
            add(
                "mask_area.png",
                "mask area",
                lambda: histogram(
                    area, "mask area", "pixels (foreground ratio × w × h)", log_x=True
                ),
            )
    if has("width") and has("height"):
        add(
            "image_sizes.png",
            "image sizes",
            lambda: size_plot(numeric["width"][ok], numeric["height"][ok]),
        )
        mp = numeric["width"][ok] * numeric["height"][ok] / 1e6
        add(
            "megapixels.png",
            "megapixels",
            lambda: histogram(mp, "image megapixels", "megapixels", log_x=True),
        )
    for name, label in METRIC_LABELS.items():
        if has(name):
            values = numeric[name][ok]
            add(f"{name}.png", label, lambda v=values, lb=label: histogram(v, lb, lb))  # type: ignore[misc]
    return plots
