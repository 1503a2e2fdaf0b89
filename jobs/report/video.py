"""The rvos page of the report: per sampled video and query, a strip of frames with the mask
overlaid and the query text, and a link to the ``--render`` MP4 when one exists.

Frames come from the video itself (decoded with decord, as the job does; a remote video goes
through the job's download cache), masks from ``<out>/frames/<video>/<query>/<frame>.png``;
the frames are spread evenly over the ones that have masks.
"""

from __future__ import annotations

import logging
import posixpath
from typing import Any

import numpy as np

from vbatch.jobs.report import page
from vbatch.jobs.report.visuals import encode_jpeg, fit, grey_to_rgb, outline, read_grey
from vbatch.operators.storage import Storage, join

logger = logging.getLogger(__name__)

#: (video, query) pairs shown, and frames per strip
PAIRS = 6
FRAMES = 6
#: mask tint (RGB) over the frame, with the outline
TINT = np.array([255, 0, 200], np.float32)


def jf_table(files: list[str], storage: Storage) -> tuple[list[dict[str, Any]], float | None]:
    """J, F and J&F per (video, query) over the frames that have a ground truth, worst first, and
    the run's J&F (the mean over pairs of (J + F) / 2, as DAVIS and Ref-YouTube-VOS average per
    object). Reads four columns; ``([], None)`` without ``gt_j``.
    """
    import pyarrow.dataset as pads

    if not files:
        return [], None
    fs = storage.arrow_fs(files[0])[0]
    data = pads.dataset([storage.arrow_fs(f)[1] for f in files], filesystem=fs, format="parquet")
    if "gt_j" not in data.schema.names:
        return [], None
    table = data.to_table(
        columns=["video_id", "query_index", "query", "gt_j", "gt_f"],
        filter=pads.field("gt_j").is_valid(),
    )
    if table.num_rows == 0:
        return [], None
    grouped = table.group_by(["video_id", "query_index"]).aggregate(
        [("gt_j", "mean"), ("gt_f", "mean"), ("gt_j", "count"), ("query", "min")]
    )
    rows = [
        {
            "video_id": r["video_id"],
            "query_index": r["query_index"],
            "query": r["query_min"],
            "frames": r["gt_j_count"],
            "j": r["gt_j_mean"],
            "f": r["gt_f_mean"],
            "jf": (r["gt_j_mean"] + r["gt_f_mean"]) / 2,
        }
        for r in grouped.to_pylist()
    ]
    rows.sort(key=lambda r: (r["jf"], r["video_id"], r["query_index"]))
    return rows, float(np.mean([r["jf"] for r in rows]))


def jf_section(files: list[str], storage: Storage, shown: int = 20) -> str:
    """The report's J&F table (empty without ground truth): the run's J&F, the worst pairs."""
    rows, overall = jf_table(files, storage)
    if overall is None:
        return ""
    j = float(np.mean([r["j"] for r in rows]))
    f = float(np.mean([r["f"] for r in rows]))
    return (
        f"<h2>Videos against the ground truth: J&amp;F {overall:.3f}</h2>"
        f'<p class="muted">Over {len(rows)} (video, query) pairs with a <code>gt_mask_dir</code>: '
        f"J {j:.3f}, F {f:.3f}, each the mean over pairs of the per-frame mean (DAVIS, "
        f"Ref-YouTube-VOS). The {min(shown, len(rows))} lowest pairs:</p>"
        + page.table(
            ("video", "query", "text", "frames scored", "J", "F", "J&F"),
            (
                (r["video_id"], r["query_index"], r["query"], r["frames"], r["j"], r["f"], r["jf"])
                for r in rows[:shown]
            ),
            numeric=(1, 3, 4, 5, 6),
        )
    )


def _frames_with_masks(folder: str, storage: Storage) -> list[int]:
    """The frames with a mask in ``folder`` (one query's masks of one video)."""
    names = [posixpath.basename(f)[: -len(".png")] for f in storage.list_files(folder, ".png")]
    return sorted(int(n) for n in names if n.isdigit())


def _overlay(frame: np.ndarray, mask: np.ndarray) -> np.ndarray:
    tinted = frame.astype(np.float32)
    m = mask > 127
    tinted[m] = 0.55 * tinted[m] + 0.45 * TINT
    return outline(tinted.astype(np.uint8), mask, thickness=1)


def video_section(
    rows: dict[int, dict[str, Any]], out: str, root: str, storage: Storage, base_uri: str
) -> str:
    """The section's HTML (empty when the rows are not video frames); writes its pictures under
    ``root/video/``.

    Args:
        rows: detail rows of the sampled positions (:func:`vbatch.jobs.report.data.read_rows`).
        out: the run's folder; root: the report's folder; base_uri: resolves relative video URIs.
    """
    pairs: dict[tuple[str, int], dict[str, Any]] = {}
    for row in rows.values():
        if row.get("video_id") is None or row.get("query_index") is None:
            continue
        if row.get("status") == "ok" and len(pairs) < PAIRS:
            pairs.setdefault((row["video_id"], int(row["query_index"])), row)
    if not pairs:
        return ""
    # imported only for video tables: the video modules pull in the model registry (seconds of
    # imports and hundreds of MB an image run's report does not need)
    from vbatch.operators.cache import localize_video
    from vbatch.operators.outputs import safe_name
    from vbatch.operators.storage import resolve
    from vbatch.operators.video.container import open_video

    parts = [
        '<h2>Videos: masks per query</h2><p class="muted">Sampled videos and queries; frames '
        "spread evenly over the ones with masks, the mask tinted and outlined.</p>"
    ]
    for k, ((video_id, qi), row) in enumerate(sorted(pairs.items())):
        notes: list[str] = []
        pics: list[tuple[str, str, int, int]] = []
        try:
            # the folder of the run that wrote this query's masks (jobs.publish: products live
            # under the run's own products/<run id>/)
            folder = posixpath.dirname(row["mask_uri"])
            indices = _frames_with_masks(folder, storage)
            spread = np.linspace(0, len(indices) - 1, min(FRAMES, len(indices))).round()
            chosen = [indices[int(i)] for i in spread] if indices else []
            frames: np.ndarray | None = None
            try:
                vr = open_video(localize_video(storage, resolve(row["uri"].strip(), base_uri)))
                frames = vr.get_batch(chosen).asnumpy() if chosen else None
            except Exception as e:
                notes.append(f"video unreadable ({type(e).__name__}): masks only")
            for j, f in enumerate(chosen):
                data = storage.read_bytes(join(folder, f"{f}.png"))
                if frames is not None:
                    frame = fit(frames[j])
                    picture = _overlay(frame, read_grey(data, frame.shape[:2]))
                else:
                    picture = grey_to_rgb(read_grey(data))
                name = f"video/{k:03d}-{j:02d}.jpg"
                storage.write_bytes(join(root, name), encode_jpeg(picture), "image/jpeg")
                pics.append((name, f"frame {f}", int(picture.shape[1]), int(picture.shape[0])))
        except Exception as e:
            logger.warning("report: the strip of %r query %d failed: %s", video_id, qi, e)
            notes.append(f"strip failed: {type(e).__name__}: {e}")
        render = join(out, "renders", safe_name(video_id) + ".mp4")
        link = (
            f' · <a href="../renders/{page.esc(safe_name(video_id))}.mp4">render (MP4)</a>'
            if storage.exists(render)
            else ""
        )
        meta = (
            f"<b>{page.esc(video_id)}</b> · query {qi}: “{page.esc(row.get('query'))}”{link}"
            + "".join(f' · <span class="note">{page.esc(n)}</span>' for n in notes)
        )
        parts.append(page.card(pics, meta))
    return "".join(parts)
