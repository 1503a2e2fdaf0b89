"""Resume of the video job after a crash (``jobs.video_resume``): the rerun of the same command
decodes and infers only the windows the crashed run had not staged, and the published table has
every (video, query, frame) row, and every failed video's rows, exactly once.

The unit test stages every mix of whole, partial and missing windows of a manifest with a
duplicate id, failed videos and a query that cannot run, and checks the rerun's stages complete
it exactly. A real driver killed at a window (``VBATCH_FAULT=hang:<row>:<k>``), then the same
command again, is the row-job contract's (``tests/test_row_jobs.py``, every job on both stores).
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tests.test_video_job import FPS
from vbatch.jobs.config import key_fields
from vbatch.jobs.publish import InjectedFault
from vbatch.jobs.resume import run_key
from vbatch.jobs.video import VideoConfig
from vbatch.jobs.video_resume import (
    StagedRows,
    drop_done_windows,
    drop_failed_videos,
    drop_staged_rows,
    fault_window,
    previous_video_attempt,
    stop_from_window,
)
from vbatch.models.rvos import owned_frames, plan_windows
from vbatch.operators.manifest import ERROR, ROW
from vbatch.operators.storage import Storage
from vbatch.operators.tables import STAGING
from vbatch.operators.video.columns import (
    LOGITS,
    OWN_START,
    OWN_STOP,
    QUERY_ERRORS,
    START,
    STOP,
    TIMES,
    WINDOW,
)
from vbatch.operators.video.plan import WINDOW_TYPES
from vbatch.operators.video.write import write_window_masks

# -- the window-skipping stages, without Ray -------------------------------------------------------
# video_id, queries, per-query errors, frames (None: the whole video failed), the video's error
UNIT = [
    ("a", ["q0", "q1"], [None, None], 43, None),  # 3 windows
    ("a", ["x"], [None], None, "manifest row 1: duplicate video_id 'a' (first at row 0)"),
    ("b", ["q", ""], [None, "query is empty"], 25, None),  # 2 windows, a query that cannot run
    ("c", ["p", "r"], [None, None], None, "cannot read video c.mp4: corrupt: unreadable box"),
    ("d", [], [], None, "manifest row 4: queries is empty (at least one text query is needed)"),
    ("e", ["s"], [None], 18, None),  # 1 window
]


def _unit_manifest() -> pa.Table:
    return pa.table(
        {
            "video_id": [u[0] for u in UNIT],
            "queries": pa.array([u[1] for u in UNIT], pa.list_(pa.string())),
            ROW: pa.array(range(len(UNIT)), pa.int64()),
            ERROR: pa.array([u[4] for u in UNIT], pa.string()),
            QUERY_ERRORS: pa.array([u[2] for u in UNIT], pa.list_(pa.string())),
        }
    )


def _unit_windows() -> pa.Table:
    """What the plan stage emits for :data:`UNIT`, every window failed at inference (its result
    rows have the keys of ok rows: one per valid query and owned frame, plus window 0's
    query-error rows)."""
    rows = []
    for m, (vid, queries, q_errors, frames, error) in enumerate(UNIT):
        base = {k: None for k in WINDOW_TYPES} | {
            "video_id": vid,
            "uri": f"{vid}.mp4",
            "queries": queries,
            ROW: m,
            QUERY_ERRORS: q_errors,
            ERROR: error,
        }
        if frames is None:
            rows.append(base)
            continue
        windows = plan_windows(frames)
        for k, ((s, e), (a, b)) in enumerate(zip(windows, owned_frames(windows), strict=True)):
            rows.append(
                base
                | {
                    WINDOW: k,
                    START: s,
                    STOP: e,
                    OWN_START: a,
                    OWN_STOP: b,
                    TIMES: [f / FPS for f in range(a, b)],
                    ERROR: f"frames {a}-{b - 1}: inference failed: RuntimeError: test",
                }
            )
    table = pa.Table.from_pylist(rows, schema=pa.schema(WINDOW_TYPES))
    table = table.append_column(LOGITS, pa.nulls(table.num_rows, pa.large_binary()))
    return table.append_column("model_version", pa.nulls(table.num_rows, pa.string()))


def _write(windows: pa.Table) -> pa.Table:
    return write_window_masks(windows, out_uri="/nonexistent", storage=Storage())


def _key(r: dict) -> tuple:
    q, f = r["query_index"], r["frame_index"]
    return (r["manifest_row"], q is None, q or 0, f is None, f or 0)


def test_rerun_stages_complete_any_staged_state_exactly() -> None:
    """Whole, partial and missing windows (and failed videos' rows), drawn at random: the rerun
    redoes exactly the windows not wholly staged, and staged + new rows are every row once."""
    windows = _unit_windows()
    per_window = [_write(windows.slice(i, 1)) for i in range(windows.num_rows)]
    full = sorted(pa.concat_tables(per_window).to_pylist(), key=_key)
    assert len({_key(r) for r in full}) == len(full) == 2 * 43 + 25 + 1 + 1 + 2 + 1 + 18
    rng = np.random.default_rng(0)
    for _ in range(200):
        state = rng.integers(0, 3, windows.num_rows)  # 0 missing, 1 whole, 2 partial
        staged_parts = []
        for i, rows in enumerate(per_window):
            if state[i] == 2 and rows.num_rows == 1:  # a window of one row cannot be partial
                state[i] = 0
            if state[i] == 2:
                keep = rng.permutation(rows.num_rows)[: rng.integers(1, rows.num_rows)]
                staged_parts.append(rows.take(np.sort(keep)))
            elif state[i] == 1:
                staged_parts.append(rows)
        staged_table = pa.concat_tables([per_window[0].slice(0, 0), *staged_parts])
        staged = StagedRows.from_table(staged_table)

        manifest = drop_failed_videos(_unit_manifest(), staged)
        todo = windows.filter(pc.is_in(windows.column(ROW), manifest.column(ROW)))
        todo = drop_done_windows(todo, staged)
        redone = {(r[ROW], r[WINDOW]) for r in todo.select([ROW, WINDOW]).to_pylist()}
        every = [(r[ROW], r[WINDOW]) for r in windows.select([ROW, WINDOW]).to_pylist()]
        assert redone == {w for w, s in zip(every, state, strict=True) if s != 1}
        new = drop_staged_rows(_write(todo), staged)
        got = sorted(staged_table.to_pylist() + new.to_pylist(), key=_key)
        assert got == full


def test_failed_video_and_query_error_rows_are_told_apart() -> None:
    """A good video's query-error row (window 0) does not make it a failed video; a duplicate id
    is known by its manifest row, not its id."""
    windows = _unit_windows()  # rows: a (3 windows), a (duplicate), b (2), c, d, e (1)
    b0 = _write(windows.slice(4, 1))
    query_error = b0.filter(pc.is_null(b0.column("frame_index")))
    assert query_error.select(["manifest_row", "query_index"]).to_pylist() == [
        {"manifest_row": 2, "query_index": 1}
    ]
    duplicate, failed = _write(windows.slice(3, 1)), _write(windows.slice(6, 1))
    staged = StagedRows.from_table(pa.concat_tables([query_error, duplicate, failed]))
    assert drop_failed_videos(_unit_manifest(), staged).column(ROW).to_pylist() == [0, 2, 4, 5]
    # b's window 0 is not done without its frames; the duplicate and c are
    assert drop_done_windows(windows, staged).column(ROW).to_pylist() == [0, 0, 0, 2, 2, 4, 5]


def test_previous_attempt_drops_cut_and_infrastructure_files(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    staging = tmp_path / "out" / STAGING / "run-x"
    staging.mkdir(parents=True)
    rows = _write(_unit_windows().slice(0, 1))  # "a", window 0: 2 queries x 18 frames
    pq.write_table(rows, staging / "good.parquet")
    buf = io.BytesIO()
    pq.write_table(_write(_unit_windows().slice(1, 1)), buf)
    (staging / "cut.parquet").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    infra = _write(_unit_windows().slice(2, 1))
    errors = ["frames 36-42: write failed: OSError: storage unavailable after 5 retries: x"] + [
        None
    ] * (infra.num_rows - 1)
    infra = infra.set_column(
        infra.schema.get_field_index("error"), "error", pa.array(errors, pa.string())
    )
    pq.write_table(infra, staging / "infra.parquet")
    attempt = previous_video_attempt(out, Storage(), "run-x")
    assert (attempt.rows, attempt.dropped) == (36, 2)
    assert sorted(p.name for p in staging.iterdir()) == ["good.parquet"]
    assert attempt.staged.covered(
        np.array([0 << 32 | 1, 0 << 32 | 2]), np.array([0, 0]), np.array([18, 18])
    ).all()
    assert not attempt.staged.covered(np.array([0 << 32 | 1]), np.array([0]), np.array([19]))[0]


def test_fault_spec_and_run_key() -> None:
    assert fault_window("hang:3") == (3, 0, True)
    assert fault_window("rows:1:2") == (1, 2, False)
    assert fault_window("publish:after-stage") is None and fault_window(None) is None
    windows = _unit_windows()
    stop_from_window(windows.slice(0, 2), 0, 2)  # windows 0 and 1 of row 0: before the fault
    with pytest.raises(InjectedFault, match="window 2 of manifest row 0"):
        stop_from_window(windows.slice(1, 2), 0, 2)
    with pytest.raises(InjectedFault):
        stop_from_window(windows.slice(3, 1), 1, 0)  # row 2 is after row 1
    config = VideoConfig("m", "d", "o", actors=1)

    def key(c: VideoConfig) -> str:
        return run_key(key_fields(c), [], [])

    # renders, placement, locations and limits decide no row; precision and limit do
    same = dataclasses.replace(config, render=True, actors=4, out="elsewhere", max_error_rate=1.0)
    assert key(same) == key(config)
    assert key(dataclasses.replace(config, precision="bf16")) != key(config)
    assert key(dataclasses.replace(config, limit=2)) != key(config)
