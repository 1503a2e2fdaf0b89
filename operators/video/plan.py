"""Stage 1, plan (CPU task per video): probe the video and emit one row per window.

Nothing is decoded but the first frame (for the size): the frame count and timestamps come from the
container's index. A video that cannot be resolved, fetched or opened becomes its error row here.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from vbatch.models.rvos import owned_frames, plan_windows
from vbatch.operators.cache import localize_video
from vbatch.operators.manifest import ERROR, ROW
from vbatch.operators.redact import redact_uri
from vbatch.operators.storage import Storage, resolve
from vbatch.operators.video.columns import (
    HEIGHT,
    KEY_COLUMNS,
    OWN_START,
    OWN_STOP,
    QUERY_ERRORS,
    START,
    STOP,
    TIMES,
    WIDTH,
    WINDOW,
)
from vbatch.operators.video.container import describe_video_error, probe_video

#: the columns of a window row, with their types
WINDOW_TYPES = {
    "video_id": pa.string(), "uri": pa.string(), "queries": pa.list_(pa.string()),
    "start_s": pa.float64(), "end_s": pa.float64(), "gt_mask_dir": pa.string(),
    ROW: pa.int64(), ERROR: pa.string(),
    QUERY_ERRORS: pa.list_(pa.string()), WINDOW: pa.int32(), START: pa.int64(), STOP: pa.int64(),
    OWN_START: pa.int64(), OWN_STOP: pa.int64(), HEIGHT: pa.int32(), WIDTH: pa.int32(),
    TIMES: pa.list_(pa.float64()),
}  # fmt: skip
_WINDOW_COLUMNS = (WINDOW, START, STOP, OWN_START, OWN_STOP, HEIGHT, WIDTH, TIMES)


def frame_range(times: np.ndarray, start_s: float | None, end_s: float | None) -> tuple[int, int]:
    """Frames whose timestamps lie in ``[start_s, end_s)`` (half-open; ``None`` = unbounded)."""
    lo = 0 if start_s is None else int(np.searchsorted(times, start_s - 1e-6, side="left"))
    hi = len(times) if end_s is None else int(np.searchsorted(times, end_s - 1e-6, side="left"))
    return lo, hi


def plan_video_windows(batch: pa.Table, *, storage: Storage, base_uri: str) -> pa.Table:
    """One row per window of each good video; one row (window null) per failed video.

    Args:
        batch: manifest rows (``video_id, uri, queries, start_s, end_s, _vb_row, _vb_error,
            _vb_query_errors``).
        storage: reaches the videos. base_uri: the manifest's folder (relative URIs).

    Returns:
        The manifest columns (``uri`` resolved) plus ``_vb_window, _vb_start, _vb_stop,
        _vb_own_start, _vb_own_stop, _vb_height, _vb_width, _vb_times``.
    """
    out: dict[str, list] = {name: [] for name in WINDOW_TYPES}

    def emit(r: dict, uri: str | None, err: str | None, **window) -> None:
        for k in (*KEY_COLUMNS, ROW, QUERY_ERRORS):
            out[k].append(r.get(k))  # (optional columns: gt_mask_dir)
        out["uri"][-1] = uri
        out[ERROR].append(err)
        for k in _WINDOW_COLUMNS:
            out[k].append(window.get(k))

    for r in batch.to_pylist():
        raw_uri = r["uri"]
        if r[ERROR] is not None:
            emit(r, raw_uri, r[ERROR])
            continue
        uri, path = None, None
        try:  # resolving is part of the row: an unsupported scheme is this video's error
            uri = resolve(raw_uri.strip(), base_uri)
            path = localize_video(storage, uri)
            probe = probe_video(path)
        except Exception as e:  # a missing or unreadable video is a row error, never a crash
            if uri is None:
                emit(r, raw_uri, redact_uri(f"cannot resolve video uri {raw_uri!r}: {e}"))
            else:
                emit(r, uri, describe_video_error(e, uri, path))
            continue
        lo, hi = frame_range(probe.timestamps, r["start_s"], r["end_s"])
        if hi <= lo:
            emit(
                r,
                uri,
                f"no frames between start_s={r['start_s']} and end_s={r['end_s']} "
                f"(the video has {probe.num_frames} frames, "
                f"{probe.timestamps[-1]:.3f} s the last)",
            )
            continue
        windows = plan_windows(hi - lo)
        for k, ((s, stop), (a, b)) in enumerate(zip(windows, owned_frames(windows), strict=True)):
            emit(
                r,
                uri,
                None,
                **{
                    WINDOW: k,
                    START: lo + s,
                    STOP: lo + stop,
                    OWN_START: lo + a,
                    OWN_STOP: lo + b,
                    HEIGHT: probe.height,
                    WIDTH: probe.width,
                    TIMES: probe.timestamps[lo + a : lo + b].tolist(),
                },
            )
    return pa.table({k: pa.array(v, WINDOW_TYPES[k]) for k, v in out.items()})
