"""Resume a video job after a crash, window by window (the video side of :mod:`.resume`).

The job stages under ``<out>/.staging/<run key>/`` (:func:`vbatch.jobs.resume.run_key` over the
configuration's fields that decide results, ``jobs.config.key_fields``). Its unit of work is a window, but a result row names
a (manifest row, query, frame), so the rerun knows a window by its rows. :class:`StagedRows` holds,
per (manifest row, query), the runs of consecutive frames staged, and the (manifest row, query)
pairs of the rows without a frame (a failed video's, a query's that cannot run). Then:
:func:`drop_failed_videos` (before the plan) drops a video whose failure is staged for every query,
not fetched again; :func:`drop_done_windows` (after the plan) drops a window whose every row is
staged, not decoded or inferred again; :func:`drop_staged_rows` (after the write stage) drops a
result row already staged, so that a window whose rows a lost file held in part is completed, never
duplicated. Staged files are read as by :func:`vbatch.jobs.resume.previous_attempt`: one cut
short, or holding an infrastructure error, is deleted and its rows redone.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vbatch.jobs.resume import HANG_FAULT, ROWS_FAULT, staged_tables, stop_here
from vbatch.operators.manifest import ROW, sorted_lookup
from vbatch.operators.storage import Storage, join
from vbatch.operators.tables import STAGING
from vbatch.operators.video.columns import OWN_START, OWN_STOP, QUERY_ERRORS, WINDOW
from vbatch.operators.video.queries import valid_queries
from vbatch.schemas.errors import INFRASTRUCTURE, classify_errors
from vbatch.schemas.videos import query_errors

logger = logging.getLogger(__name__)


#: the frame index's share of a run's 64-bit sort key (the rest is its pair's rank)
_FRAME_BITS = 39
_KEY_COLUMNS = ["manifest_row", "query_index", "frame_index"]


def pair_keys(rows: np.ndarray | Sequence[int], queries: np.ndarray | Sequence[int]) -> np.ndarray:
    """int64 key of each (manifest row, query index); query index -1 stands for a null one (the row
    of a video without queries). Manifest rows below 2**31."""
    return (np.asarray(rows, np.int64) << 32) | (np.asarray(queries, np.int64) + 1)


def _empty() -> np.ndarray:
    return np.empty(0, np.int64)


@dataclass
class StagedRows:
    """The keys of the result rows an unfinished attempt staged, compact (a run of frames per
    (manifest row, query) and staged file, not a key per frame)."""

    #: sorted pair keys (:func:`pair_keys`) of the rows with a frame
    pairs: np.ndarray = field(default_factory=_empty)
    #: per run of consecutive staged frames, sorted: ``rank of its pair << 39 | first frame``
    run_start: np.ndarray = field(default_factory=_empty)
    #: one past each run's last frame
    run_stop: np.ndarray = field(default_factory=_empty)
    #: sorted pair keys of the rows without a frame (``frame_index`` null)
    unframed: np.ndarray = field(default_factory=_empty)

    @classmethod
    def from_table(cls, table: pa.Table) -> StagedRows:
        """From result rows (``manifest_row``, ``query_index``, ``frame_index``)."""
        if table.num_rows == 0:
            return cls()
        keys = pair_keys(
            table.column("manifest_row").to_numpy(),
            pc.fill_null(table.column("query_index"), -1).to_numpy(),
        )
        frame = table.column("frame_index")
        framed = pc.is_valid(frame).to_numpy(zero_copy_only=False)
        frames = pc.fill_null(frame, 0).to_numpy()[framed]
        keys_f = keys[framed]
        order = np.lexsort((frames, keys_f))
        keys_f, frames = keys_f[order], frames[order]
        # a new run where the pair changes or a frame is skipped (a duplicate frame continues one)
        new = np.ones(len(keys_f), bool)
        new[1:] = (keys_f[1:] != keys_f[:-1]) | (frames[1:] > frames[:-1] + 1)
        first = np.flatnonzero(new)
        last = np.append(first[1:], len(keys_f))[: len(first)] - 1
        pairs = np.unique(keys_f)
        rank = np.searchsorted(pairs, keys_f[first]).astype(np.int64)
        return cls(
            pairs=pairs,
            run_start=(rank << _FRAME_BITS) | frames[first],
            run_stop=frames[last] + 1,
            unframed=np.unique(keys[~framed]),
        )

    def covered(self, pairs: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
        """Whether frames ``[start, stop)`` of each pair are all staged."""
        found, rank = sorted_lookup(np.asarray(pairs, np.int64), self.pairs)
        if not found.any():
            return found
        # the last run starting at or before each start: the one holding it, if its pair's
        at = np.searchsorted(self.run_start, (rank << _FRAME_BITS) | starts, side="right") - 1
        held = found & (at >= 0)
        at = np.clip(at, 0, None)
        return held & ((self.run_start[at] >> _FRAME_BITS) == rank) & (self.run_stop[at] >= stops)

    def has_unframed(self, pairs: np.ndarray) -> np.ndarray:
        """Whether a row without a frame is staged for each pair."""
        return sorted_lookup(np.asarray(pairs, np.int64), self.unframed)[0]


@dataclass
class VideoAttempt:
    """What an unfinished video run with the same key staged."""

    files: list[str] = field(default_factory=list)
    staged: StagedRows = field(default_factory=StagedRows)
    rows: int = 0
    #: files deleted: unreadable (cut short) or holding infrastructure errors
    dropped: int = 0


def previous_video_attempt(out: str, storage: Storage, key: str) -> VideoAttempt:
    """Read the staged files of an unfinished video run ``key`` under ``out``, deleting those that
    cannot count (a local file cut short; one with infrastructure error rows, redone).

    Returns:
        The files kept and their rows' keys (empty when there was no such run).
    """
    kept, dropped = staged_tables(
        out,
        storage,
        key,
        [*_KEY_COLUMNS, "error"],
        lambda t: bool(
            pc.any(pc.equal(classify_errors(t.column("error")), INFRASTRUCTURE)).as_py()
        ),
    )
    found = VideoAttempt(files=[uri for uri, _ in kept], dropped=dropped)
    tables = [table.select(_KEY_COLUMNS) for _, table in kept]
    if tables:
        found.staged = StagedRows.from_table(pa.concat_tables(tables))
        found.rows = sum(t.num_rows for t in tables)
    if found.files or found.dropped:
        logger.info(
            "resume: %d result rows in %d staged files of an unfinished run (%s); %d files dropped",
            found.rows,
            len(found.files),
            join(out, STAGING, key),
            found.dropped,
        )
    return found


def _failure_pairs(row: int, queries: Sequence[str | None] | None) -> np.ndarray:
    """The pairs of a failed video's rows: one per query, or one without a query."""
    n = len(queries or [])
    return pair_keys([row] * n, range(n)) if n else pair_keys([row], [-1])


def drop_failed_videos(batch: pa.Table, staged: StagedRows) -> pa.Table:
    """Ray Data stage on the manifest rows: drop those whose failure is staged for every query.

    A good video can never match: a query that cannot run gives it a row without a frame, but at
    least one of its queries runs (else the manifest pass fails the whole video)."""
    rows = batch.column(ROW).to_pylist()
    queries = batch.column("queries").to_pylist()
    done = [
        staged.has_unframed(_failure_pairs(r, q)).all() for r, q in zip(rows, queries, strict=True)
    ]
    return batch.filter(pa.array(np.logical_not(done), pa.bool_())) if any(done) else batch


def drop_done_windows(batch: pa.Table, staged: StagedRows) -> pa.Table:
    """Ray Data stage on the planned windows (:func:`vbatch.operators.video.plan.plan_video_windows`):
    drop a window whose every result row is staged: each valid query over the frames it owns, and
    on window 0 the rows of the queries that cannot run; a failed video (window null) as in
    :func:`drop_failed_videos`."""
    done = []
    for r in batch.select([ROW, "queries", QUERY_ERRORS, WINDOW, OWN_START, OWN_STOP]).to_pylist():
        m, queries, q_errors = r[ROW], r["queries"], r[QUERY_ERRORS]
        if r[WINDOW] is None:
            done.append(bool(staged.has_unframed(_failure_pairs(m, queries)).all()))
            continue
        valid = [qi for qi, _ in valid_queries(queries, q_errors)]
        n = len(valid)
        ok = staged.covered(
            pair_keys([m] * n, valid), np.full(n, r[OWN_START]), np.full(n, r[OWN_STOP])
        ).all()
        if r[WINDOW] == 0:
            errors = query_errors(queries) if q_errors is None else q_errors
            bad = [qi for qi, e in enumerate(errors) if e is not None]
            ok = ok and staged.has_unframed(pair_keys([m] * len(bad), bad)).all()
        done.append(bool(ok))
    return batch.filter(pa.array(np.logical_not(done), pa.bool_())) if any(done) else batch


def drop_staged_rows(batch: pa.Table, staged: StagedRows) -> pa.Table:
    """Ray Data stage on the result rows: drop those already staged (same manifest row, query and
    frame, or same manifest row and query for a row without a frame)."""
    if batch.num_rows == 0:
        return batch
    pairs = pair_keys(
        batch.column("manifest_row").to_numpy(zero_copy_only=False),
        pc.fill_null(batch.column("query_index"), -1).to_numpy(zero_copy_only=False),
    )
    frame = batch.column("frame_index")
    framed = pc.is_valid(frame).to_numpy(zero_copy_only=False)
    frames = pc.fill_null(frame, 0).to_numpy(zero_copy_only=False)
    done = np.where(framed, staged.covered(pairs, frames, frames + 1), staged.has_unframed(pairs))
    return batch.filter(pa.array(~done)) if done.any() else batch


def fault_window(spec: str | None) -> tuple[int, int, bool] | None:
    """``(row, window, hang)`` of a ``VBATCH_FAULT`` of ``rows:<row>[:<window>]`` (raise) or
    ``hang:<row>[:<window>]`` (block until killed), else ``None``. ``hang:<N>`` means what it means
    for the image jobs: from manifest row N on."""
    for prefix, hang in ((ROWS_FAULT, False), (HANG_FAULT, True)):
        if spec and spec.startswith(prefix):
            row, _, window = spec[len(prefix) :].partition(":")
            return int(row), int(window or 0), hang
    return None


def stop_from_window(batch: pa.Table, row: int, window: int, hang: bool = False) -> pa.Table:
    """Ray Data stage before the write stage: raise (or block, ``hang``) on a batch holding window
    ``window`` of manifest row ``row`` or a later one in (manifest row, window) order (a failed
    video's row counts as window 0)."""
    rows = batch.column(ROW).to_pylist()
    windows = pc.fill_null(batch.column(WINDOW), 0).to_pylist()
    if any((r, w) >= (row, window) for r, w in zip(rows, windows, strict=True)):
        stop_here(f"window {window} of manifest row {row} or later", f"{row}:{window}", hang)
    return batch
