"""Stage 4, write (CPU task per window): the owned frames' masks as PNGs, and the result rows."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import torch

from vbatch.models.rvos.transforms import frame_masks
from vbatch.operators.columns import decode_array
from vbatch.operators.manifest import ERROR, ROW
from vbatch.operators.outputs import encode_png, safe_name
from vbatch.operators.quality import score_frames
from vbatch.operators.storage import Storage, join
from vbatch.operators.video.columns import (
    HEIGHT,
    INPUT_H,
    INPUT_W,
    LOGITS,
    OWN_START,
    OWN_STOP,
    QUERY_ERRORS,
    TIMES,
    WIDTH,
    WINDOW,
)
from vbatch.operators.video.queries import valid_queries
from vbatch.schemas.images import STATUS_ERROR, STATUS_OK
from vbatch.schemas.videos import query_errors, video_results_schema

logger = logging.getLogger(__name__)


def mask_uri(out_uri: str, video_id: str, query_index: int, frame_index: int) -> str:
    """``<out>/frames/<safe video_id>/<query_index>/<frame_index>.png``."""
    return join(out_uri, "frames", safe_name(video_id), str(query_index), f"{frame_index}.png")


def _result_rows(r: dict, version: str | None) -> Iterator[dict]:
    """Error rows of a window row that carries an error, and query-error rows (first window)."""
    queries = r["queries"] or []
    q_errors = r.get(QUERY_ERRORS)
    base = {
        "video_id": r["video_id"],
        "uri": r["uri"],
        "model_version": version,
        "manifest_row": r[ROW],
    }
    err = r[ERROR]
    if r[WINDOW] is None:  # the whole video failed: one row per query, or one without a query
        if not queries:
            yield {**base, "query_index": None, "query": None, "error": err}
        for qi, q in enumerate(queries):
            yield {**base, "query_index": qi, "query": q, "error": err}
        return
    if r[WINDOW] == 0:  # a query that cannot run is reported once per video
        for qi, (q, qerr) in enumerate(
            zip(queries, query_errors(queries) if q_errors is None else q_errors, strict=True)
        ):
            if qerr is not None:
                yield {**base, "query_index": qi, "query": q, "error": f"query {qi}: {qerr}"}
    if err is not None:  # this window failed: its owned frames are error rows
        for qi, q in valid_queries(queries, q_errors):
            for k, f in enumerate(range(r[OWN_START], r[OWN_STOP])):
                yield {
                    **base,
                    "query_index": qi,
                    "query": q,
                    "frame_index": f,
                    "timestamp_s": r[TIMES][k] if r[TIMES] else None,
                    "error": err,
                }


def write_window_masks(
    batch: pa.Table,
    *,
    out_uri: str,
    storage: Storage,
    io_threads: int = 8,
    gt: bool = False,
    base_uri: str = "",
) -> pa.Table:
    """Final masks of each window's owned frames → PNGs; returns :data:`VIDEO_RESULTS` rows.

    Upsampling and thresholding of :func:`vbatch.models.rvos.transforms.frame_masks` act frame by
    frame, so applying them to the owned frames alone gives exactly the frames of ``predict_video``.

    Args:
        gt: the manifest has ``gt_mask_dir``: score each frame that has a ground truth (``gt_j``,
            ``gt_f``; ``gt_error`` when a query's ground truth cannot be used; the row stays ok).
        base_uri: the manifest's folder (relative ``gt_mask_dir``).
    """
    results: list[dict] = []
    versions = batch.column("model_version").to_pylist()
    raw = batch.column(LOGITS).to_pylist()
    rows = batch.drop_columns([LOGITS]).to_pylist()
    for r, blob, version in zip(rows, raw, versions, strict=True):
        results.extend(_result_rows(r, version))
        if r[ERROR] is not None:
            continue
        try:
            if blob is None:
                raise RuntimeError("internal error: no model output for this window")
            logits = torch.from_numpy(decode_array(blob))
            masks = frame_masks(
                logits, (r[INPUT_H], r[INPUT_W]), (r[HEIGHT], r[WIDTH])
            ).numpy()  # (Q, frames, H, W)
            jobs, done = [], []
            for j, (qi, q) in enumerate(valid_queries(r["queries"], r[QUERY_ERRORS])):
                for k, f in enumerate(range(r[OWN_START], r[OWN_STOP])):
                    uri = mask_uri(out_uri, r["video_id"], qi, f)
                    jobs.append((uri, masks[j, k]))
                    done.append(
                        {
                            "video_id": r["video_id"],
                            "uri": r["uri"],
                            "query_index": qi,
                            "query": q,
                            "frame_index": f,
                            "timestamp_s": r[TIMES][k],
                            "mask_uri": uri,
                            "model_version": version,
                            "manifest_row": r[ROW],
                        }
                    )
            with ThreadPoolExecutor(max_workers=io_threads) as pool:
                # PNG encoding releases the GIL and S3 writes wait on the network: threads overlap both
                list(pool.map(lambda job: storage.write_bytes(job[0], encode_png(job[1])), jobs))
            if gt:
                _score(done, masks, r, base_uri, storage)
            results.extend(done)
        except Exception as e:
            logger.exception("writing masks of %r failed", r["video_id"])
            r[ERROR] = (
                f"frames {r[OWN_START]}-{r[OWN_STOP] - 1}: write failed: {type(e).__name__}: {e}"
            )
            results.extend(
                row for row in _result_rows(r, version) if row.get("frame_index") is not None
            )
    for row in results:
        err = row.get("error")
        row["status"] = STATUS_OK if err is None else STATUS_ERROR
        row.setdefault("error", None)
    return pa.Table.from_pylist(results, schema=video_results_schema(gt))


def _score(done: list[dict], masks: Any, r: dict, base_uri: str, storage: Storage) -> None:
    """Add ``gt_j``/``gt_f``/``gt_error`` to a window's ok rows ``done`` (masks: (Q, frames, H, W),
    the valid queries in order)."""
    frames = range(r[OWN_START], r[OWN_STOP])
    for j, (qi, _) in enumerate(valid_queries(r["queries"], r[QUERY_ERRORS])):
        scores = score_frames(
            r.get("gt_mask_dir"),
            base_uri,
            qi,
            {f: masks[j, k] for k, f in enumerate(frames)},
            storage,
        )
        for row in done:
            if row["query_index"] == qi:
                metrics, problem = scores.get(row["frame_index"], ({}, None))
                row.update(metrics, gt_error=problem)
