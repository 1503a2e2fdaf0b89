"""Stages of the streaming video job (MTTR referring video object segmentation).

A video is never decoded whole. The unit of work is the window of the reference pipeline (24
frames starting every 18, :func:`vbatch.models.rvos.plan_windows`)::

    manifest (driver: one row per video, validated)
    → plan (CPU task per video): fetch the file once per node into a local cache, read its frame
      count, timestamps and size with decord (no frame is decoded), emit one row per window
    → decode (CPU task per window): decode only that window's frames (``get_batch``), resize them to
      the network's input size, ship them as uint8 ``.npy`` (≈17 MB for 24 frames at 640×360)
    → model (actor pool): one forward per window for all of the video's queries; returns the mask
      logits of the frames the window *owns* at stride 4 (≈1.4 MB per query), drops the frames
    → write (CPU task per window): upsample + threshold the owned frames' logits to the original
      size, write ``frames/<video_id>/<query_index>/<frame_index>.png``, emit one result row per
      (query, owned frame)

The overlap rule of the reference (a later window overwrites the frames it shares with an earlier
one) becomes an ownership rule: each frame belongs to the LAST window containing it
(:func:`vbatch.models.rvos.owned_frames`), so every frame is written exactly once, by whichever worker has
its window, in any order, and no reassembly step holds a video's masks.

Why decode in a CPU stage rather than in the actor: decoding overlaps with inference and the GPU
never waits on FFmpeg; shipping frames already resized to the network size (uint8, not the float
input) keeps a window's object at ≈17 MB whatever the source resolution. Why a node-local file
rather than the object's bytes: decord seeks in a file, so every window reads only its own frames,
and the object is downloaded once per node instead of once per window.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
import torchvision.transforms.functional as TF

from vbatch.models.rvos import owned_frames, plan_windows
from vbatch.models.rvos.config import MAX_SIDE, SHORT_SIDE
from vbatch.models.rvos.transforms import frame_masks, preprocess_frames, select_trajectory
from vbatch.operators.columns import decode_array, encode_array, set_column
from vbatch.operators.inference import load_actor_model
from vbatch.operators.manifest import ERROR, ROW, manifest_files, read_manifest_schema
from vbatch.operators.outputs import encode_png, safe_name
from vbatch.operators.storage import (
    Storage,
    StorageOptions,
    describe_read_error,
    is_remote,
    join,
    normalize,
    parent,
    resolve,
)
from vbatch.schemas.images import STATUS_ERROR, STATUS_OK
from vbatch.schemas.videos import (
    INTERNAL_PREFIX,
    VIDEO_RESULTS,
    ManifestError,
    check_video_manifest_schema,
    query_errors,
    video_row_errors,
)

logger = logging.getLogger(__name__)

# internal columns of the window rows
WINDOW = f"{INTERNAL_PREFIX}window"  # int32: window number in the video; null on a failed video
START = f"{INTERNAL_PREFIX}start"  # int64: first frame of the window (index in the file)
STOP = f"{INTERNAL_PREFIX}stop"  # int64: one past its last frame
OWN_START = (
    f"{INTERNAL_PREFIX}own_start"  # int64: the frames this window writes: [own_start, own_stop)
)
OWN_STOP = f"{INTERNAL_PREFIX}own_stop"
HEIGHT = f"{INTERNAL_PREFIX}height"  # int32: original frame size
WIDTH = f"{INTERNAL_PREFIX}width"
FRAMES = f"{INTERNAL_PREFIX}frames"  # large_binary: (T, h, w, 3) uint8 .npy, resized frames
TIMES = f"{INTERNAL_PREFIX}times"  # list<float64>: timestamps of the owned frames
LOGITS = f"{INTERNAL_PREFIX}logits"  # large_binary: (Q, own_stop-own_start, h/4, w/4) float32 .npy
INPUT_H = f"{INTERNAL_PREFIX}input_h"  # int32: network input size (the resized frames')
INPUT_W = f"{INTERNAL_PREFIX}input_w"

#: window rows carry these columns between stages (plus the internal ones above)
_KEY_COLUMNS = ("video_id", "uri", "queries", "start_s", "end_s")


@dataclass(frozen=True)
class VideoManifestInfo:
    uri: str
    files: tuple[str, ...]
    base_uri: str
    num_rows: int
    num_bad_rows: int
    #: queries over all rows (bad rows included)
    num_queries: int


# -- manifest ---------------------------------------------------------------------------------------
def read_video_manifest(
    uri: str, storage: Storage, limit: int | None = None, videos_per_block: int = 1
) -> tuple[ray.data.Dataset, VideoManifestInfo]:
    """Read and validate a video manifest on the driver (one small row per video).

    Args:
        uri: one Parquet file or a folder of them (local path, file:// or s3://).
        storage: the job's storage.
        limit: keep only the first ``limit`` rows in manifest order.
        videos_per_block: rows per dataset block; 1 lets every video's probe run in parallel.

    Returns:
        A dataset with ``video_id, uri, queries, start_s, end_s, _vb_row, _vb_error`` and facts.

    Raises:
        ManifestError: no such manifest, a file that is not Parquet, a missing/mistyped column.
    """
    files = manifest_files(uri, storage)
    tables = []
    for f in files:
        schema = read_manifest_schema(f, storage)
        check_video_manifest_schema(schema, f)
        fs, path = storage.arrow_fs(f)
        columns = [c for c in _KEY_COLUMNS if c in schema.names]
        table = pq.read_table(path, filesystem=fs, columns=columns)
        tables.append(
            pa.table(
                {
                    "video_id": table.column("video_id").cast(pa.string()),
                    "uri": table.column("uri").cast(pa.string()),
                    "queries": table.column("queries").cast(pa.list_(pa.string())),
                    **{
                        c: table.column(c).cast(pa.float64())
                        if c in table.column_names
                        else pa.nulls(table.num_rows, pa.float64())
                        for c in ("start_s", "end_s")
                    },
                }
            )
        )
    table = pa.concat_tables(tables)
    if limit is not None:
        table = table.slice(0, limit)
    if table.num_rows == 0:
        raise ManifestError(f"manifest {uri}: no rows")
    errors = video_row_errors(
        table.column("video_id").to_pylist(),
        table.column("uri").to_pylist(),
        table.column("queries").to_pylist(),
        table.column("start_s").to_pylist(),
        table.column("end_s").to_pylist(),
    )
    table = table.append_column(ROW, pa.array(range(table.num_rows), pa.int64()))
    table = table.append_column(ERROR, pa.array(errors, pa.string()))
    blocks = [table.slice(i, videos_per_block) for i in range(0, table.num_rows, videos_per_block)]
    single = len(files) == 1 and files[0] == normalize(uri)
    info = VideoManifestInfo(
        uri=files[0] if single else normalize(uri),
        files=tuple(files),
        base_uri=parent(files[0]) if single else normalize(uri),
        num_rows=table.num_rows,
        num_bad_rows=sum(e is not None for e in errors),
        num_queries=sum(len(q or []) for q in table.column("queries").to_pylist()),
    )
    return ray.data.from_arrow(blocks), info


# -- video files ------------------------------------------------------------------------------------
def _cache_root() -> Path:
    return Path(os.environ.get("VBATCH_CACHE", Path.home() / ".cache" / "vbatch")) / "videos"


#: default bound of the per-node video cache (``VBATCH_VIDEO_CACHE_GB`` overrides it)
VIDEO_CACHE_GB = 20.0
#: a cached video used this recently is never evicted: a task may be between finding it and
#: opening it (an open file stays readable after an unlink, a path that was just returned does not)
EVICTION_GRACE_S = 600.0


def _cache_limit() -> int:
    value = os.environ.get("VBATCH_VIDEO_CACHE_GB")
    try:
        gb = VIDEO_CACHE_GB if value is None else float(value)
    except ValueError:
        raise ValueError(f"VBATCH_VIDEO_CACHE_GB={value!r} is not a number of GB") from None
    return int(gb * 1e9)


def evict_videos(root: Path, max_bytes: int, grace_s: float | None = None) -> list[Path]:
    """Delete the least recently used cached videos until ``root`` holds at most ``max_bytes``.

    Use time is the file's mtime (:func:`localize_video` touches it on every hit). Files used
    within ``grace_s`` seconds (default :data:`EVICTION_GRACE_S`) and unfinished downloads (dot files) are kept even when that leaves
    the cache over its bound for a while. Safe with concurrent tasks: a file another task deleted
    first is skipped. Returns the files deleted.
    """
    entries = []
    for path in root.iterdir() if root.is_dir() else ():
        if path.name.startswith("."):
            continue
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        entries.append((st.st_mtime, st.st_size, path))
    total = sum(size for _, size, _ in entries)
    deleted: list[Path] = []
    now = time.time()
    grace_s = EVICTION_GRACE_S if grace_s is None else grace_s
    for mtime, size, path in sorted(entries, key=lambda e: e[0]):
        if total <= max_bytes or now - mtime < grace_s:
            break
        try:
            path.unlink()
            deleted.append(path)
        except FileNotFoundError:
            pass
        total -= size
    if deleted:
        logger.info("video cache %s: evicted %d least recently used file(s)", root, len(deleted))
    return deleted


def localize_video(storage: Storage, uri: str) -> str:
    """A local file with the video at ``uri``: the file itself when local, else a cached download.

    The cache key is the URI, size and ETag, so every window of a video on one node reuses one
    download and a changed object is fetched again. Downloads stream to disk (no copy in memory).
    The cache is bounded (``VBATCH_VIDEO_CACHE_GB``, default 20): after each download the least
    recently used videos are evicted (:func:`evict_videos`).
    """
    if not is_remote(uri):
        path = normalize(uri)
        if os.path.isdir(path):
            raise IsADirectoryError(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(path)
        return path
    fs, path = storage.fs(uri)
    info = fs.info(path)  # FileNotFoundError when missing
    if info.get("type") == "directory":
        raise IsADirectoryError(uri)
    stamp = hashlib.sha256(repr((uri, info.get("size"), info.get("ETag"))).encode()).hexdigest()
    root = _cache_root()
    target = root / (stamp[:24] + Path(path).suffix[:8])
    try:
        os.utime(target)  # a hit: mark it recently used
        return str(target)
    except FileNotFoundError:
        pass
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{target.name}.{uuid.uuid4().hex[:8]}"
    try:
        fs.get_file(path, str(tmp))
        os.replace(tmp, target)  # another task may have finished first: same content
    finally:
        tmp.unlink(missing_ok=True)
    evict_videos(root, _cache_limit())
    return str(target)


def _open(path: str):
    import decord  # imported here: only the video stages need it

    # one decoding thread: Ray runs one task per CPU; FFmpeg's own threads would oversubscribe
    return decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)


@dataclass(frozen=True)
class VideoProbe:
    num_frames: int
    height: int
    width: int
    #: (num_frames,) presentation time of every frame, seconds
    timestamps: np.ndarray


def probe_video(path: str) -> VideoProbe:
    """Frame count, size and timestamps from the container index; decodes at most one frame."""
    vr = _open(path)
    n = len(vr)
    if n == 0:
        raise ValueError("the video has no frames")
    h, w = vr[0].shape[:2]
    times = np.asarray(vr.get_frame_timestamp(list(range(n))), np.float64)[:, 0]
    return VideoProbe(n, int(h), int(w), times)


def frame_range(times: np.ndarray, start_s: float | None, end_s: float | None) -> tuple[int, int]:
    """Frames whose timestamps lie in ``[start_s, end_s)`` (half-open; ``None`` = unbounded)."""
    lo = 0 if start_s is None else int(np.searchsorted(times, start_s - 1e-6, side="left"))
    hi = len(times) if end_s is None else int(np.searchsorted(times, end_s - 1e-6, side="left"))
    return lo, hi


def _describe(e: BaseException, uri: str) -> str:
    return describe_read_error(e, uri, what="video ")


# -- stage 1: plan ----------------------------------------------------------------------------------
def plan_video_windows(batch: pa.Table, *, storage: Storage, base_uri: str) -> pa.Table:
    """One row per window of each good video; one row (window null) per failed video.

    Args:
        batch: manifest rows (``video_id, uri, queries, start_s, end_s, _vb_row, _vb_error``).

    Returns:
        The manifest columns (``uri`` resolved) plus ``_vb_window, _vb_start, _vb_stop,
        _vb_own_start, _vb_own_stop, _vb_height, _vb_width, _vb_times``.
    """
    out: dict[str, list] = {
        name: []
        for name in (
            *_KEY_COLUMNS, ROW, ERROR, WINDOW, START, STOP, OWN_START, OWN_STOP, HEIGHT, WIDTH, TIMES
        )
    }  # fmt: skip

    def emit(r: dict, uri: str | None, err: str | None, **window) -> None:
        for k in _KEY_COLUMNS:
            out[k].append(r[k])
        out["uri"][-1] = uri
        out[ROW].append(r[ROW])
        out[ERROR].append(err)
        for k in (WINDOW, START, STOP, OWN_START, OWN_STOP, HEIGHT, WIDTH, TIMES):
            out[k].append(window.get(k))

    for r in batch.to_pylist():
        raw_uri = r["uri"]
        if r[ERROR] is not None:
            emit(r, raw_uri, r[ERROR])
            continue
        uri = resolve(raw_uri.strip(), base_uri)
        try:
            probe = probe_video(localize_video(storage, uri))
        except Exception as e:  # a missing or unreadable video is a row error, never a crash
            emit(r, uri, _describe(e, uri))
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
    types = {
        "video_id": pa.string(), "uri": pa.string(), "queries": pa.list_(pa.string()),
        "start_s": pa.float64(), "end_s": pa.float64(), ROW: pa.int64(), ERROR: pa.string(),
        WINDOW: pa.int32(), START: pa.int64(), STOP: pa.int64(), OWN_START: pa.int64(),
        OWN_STOP: pa.int64(), HEIGHT: pa.int32(), WIDTH: pa.int32(), TIMES: pa.list_(pa.float64()),
    }  # fmt: skip
    return pa.table({k: pa.array(v, types[k]) for k, v in out.items()})


# -- stage 2: decode --------------------------------------------------------------------------------
def resize_frames(frames: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) uint8 → (T, h, w, 3) uint8 at the network's input size.

    The reference resizes the uint8 frames (short side 360, long side at most 640, antialiased)
    before anything else, so resizing here and normalising in the actor gives the reference's input
    bit for bit (the actor's resize to the same size is the identity).
    """
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    x = TF.resize(x, size=SHORT_SIDE, max_size=MAX_SIDE, antialias=True)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def read_window(path: str, start: int, stop: int) -> np.ndarray:
    """Frames ``[start, stop)`` of the video at ``path``: (stop-start, H, W, 3) uint8 RGB."""
    return _open(path).get_batch(list(range(start, stop))).asnumpy()


def decode_windows(
    batch: pa.Table,
    *,
    storage: Storage,
    reader: Callable[[str, int, int], np.ndarray] = read_window,
) -> pa.Table:
    """Decode each good window's frames into ``_vb_frames`` (resized, uint8 .npy).

    One window is decoded at a time; the stage runs with one window per batch, so a task holds the
    frames of one window, whatever the length of the video.
    """
    errors = batch.column(ERROR).to_pylist()
    frames: list[bytes | None] = [None] * batch.num_rows
    rows = batch.select(["uri", START, STOP]).to_pylist()
    for i, r in enumerate(rows):
        if errors[i] is not None:
            continue
        try:
            window = reader(localize_video(storage, r["uri"]), r[START], r[STOP])
            if window.shape[0] != r[STOP] - r[START]:
                raise ValueError(f"decoded {window.shape[0]} frames, expected {r[STOP] - r[START]}")
            frames[i] = encode_array(resize_frames(window))
            del window
        except Exception as e:
            errors[i] = f"frames {r[START]}-{r[STOP] - 1}: {_describe(e, r['uri'])}"
    batch = set_column(batch, FRAMES, pa.array(frames, pa.large_binary()))
    return set_column(batch, ERROR, pa.array(errors, pa.string()))


def valid_queries(queries: Sequence[str | None] | None) -> list[tuple[int, str]]:
    """(index in the manifest's list, text) of the queries that can run."""
    return [
        (i, q)
        for i, (q, e) in enumerate(zip(queries or [], query_errors(queries), strict=True))
        if e is None and q is not None
    ]


# -- stage 3: model ---------------------------------------------------------------------------------
class WindowModelStage:
    """Ray Data actor: ``_vb_frames`` → ``_vb_logits`` (owned frames only) and ``model_version``."""

    def __init__(
        self,
        model_dir: str,
        storage_options: StorageOptions,
        device: str | None = None,
        threads: int | None = None,
        model_options: dict | None = None,
    ) -> None:
        self.predictor = load_actor_model(
            "rvos", model_dir, storage_options, device, threads, model_options
        )

    def window_logits(self, frames: np.ndarray, queries: Sequence[str]) -> torch.Tensor:
        """What :meth:`RVOSPredictor.predict_window` computes, stopped before the upsampling.

        Args:
            frames: (T, h, w, 3) uint8, already at the network's input size.
            queries: B texts, all run in one forward (the backbone runs once for all of them).

        Returns: (B, T, h/4, w/4) float32 mask logits of the chosen query slots.
        """
        clip = preprocess_frames(frames)  # resize is the identity here: frames are already sized
        out = self.predictor.run_network(clip, queries)  # type: ignore[attr-defined]  # RvosPredictor
        logits, _ = select_trajectory(out["pred_is_referred"], out["pred_masks"])
        return logits.float().cpu()

    def __call__(self, batch: pa.Table) -> pa.Table:
        errors = batch.column(ERROR).to_pylist()
        raw = batch.column(FRAMES).to_pylist()
        rows = batch.select(["queries", START, OWN_START, OWN_STOP]).to_pylist()
        logits: list[bytes | None] = [None] * batch.num_rows
        in_h: list[int | None] = [None] * batch.num_rows
        in_w: list[int | None] = [None] * batch.num_rows
        for i, r in enumerate(rows):
            if errors[i] is not None or raw[i] is None:
                continue
            try:
                frames = decode_array(raw[i])
                queries = [q for _, q in valid_queries(r["queries"])]
                with torch.inference_mode():
                    out = self.window_logits(frames, queries)
                a, b = r[OWN_START] - r[START], r[OWN_STOP] - r[START]
                logits[i] = encode_array(out[:, a:b].numpy())
                in_h[i], in_w[i] = frames.shape[1:3]
            except Exception as e:  # this window fails; the video's other windows go on
                logger.exception("window forward failed")
                errors[i] = (
                    f"frames {r[OWN_START]}-{r[OWN_STOP] - 1}: inference failed: "
                    f"{type(e).__name__}: {e}"
                )
        batch = batch.drop_columns([FRAMES])
        batch = set_column(batch, LOGITS, pa.array(logits, pa.large_binary()))
        batch = set_column(batch, INPUT_H, pa.array(in_h, pa.int32()))
        batch = set_column(batch, INPUT_W, pa.array(in_w, pa.int32()))
        version = pa.array([self.predictor.model_version] * batch.num_rows, pa.string())
        batch = set_column(batch, "model_version", version)
        return set_column(batch, ERROR, pa.array(errors, pa.string()))


# -- stage 4: write ---------------------------------------------------------------------------------
def mask_uri(out_uri: str, video_id: str, query_index: int, frame_index: int) -> str:
    """``<out>/frames/<safe video_id>/<query_index>/<frame_index>.png``."""
    return join(out_uri, "frames", safe_name(video_id), str(query_index), f"{frame_index}.png")


def _result_rows(r: dict, version: str | None) -> Iterator[dict]:
    """Error rows of a window row that carries an error, and query-error rows (first window)."""
    queries = r["queries"] or []
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
        for qi, (q, qerr) in enumerate(zip(queries, query_errors(queries), strict=True)):
            if qerr is not None:
                yield {**base, "query_index": qi, "query": q, "error": f"query {qi}: {qerr}"}
    if err is not None:  # this window failed: its owned frames are error rows
        for qi, q in valid_queries(queries):
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
    batch: pa.Table, *, out_uri: str, storage: Storage, io_threads: int = 8
) -> pa.Table:
    """Final masks of each window's owned frames → PNGs; returns :data:`VIDEO_RESULTS` rows.

    Upsampling and thresholding of :func:`vbatch.models.rvos.transforms.frame_masks` act frame by frame,
    so applying them to the owned frames alone gives exactly the frames of ``predict_video``.
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
            for j, (qi, q) in enumerate(valid_queries(r["queries"])):
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
    return pa.Table.from_pylist(results, schema=VIDEO_RESULTS)


# -- optional: renders ------------------------------------------------------------------------------
_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
            (145, 30, 180), (70, 240, 240), (240, 50, 230)]  # fmt: skip


def render_video(
    uri: str,
    video_id: str,
    queries: list[tuple[int, str]],
    frame_indices: list[int],
    out_uri: str,
    storage: Storage,
    fps: float | None = None,
) -> str:
    """An MP4 of the video's frames with every query's mask overlaid in its own colour.

    Reads the video and the written masks window by window (memory: one window), draws the queries
    in a legend band above the frames, writes ``<out>/renders/<video_id>.mp4`` (mp4v).

    Args:
        uri: the video. video_id: its id. queries: (query_index, text) to draw.
        frame_indices: the frames that have masks, in order. out_uri: the job's output folder.
    """
    import cv2

    path = localize_video(storage, uri)
    vr = _open(path)
    fps = fps or float(vr.get_avg_fps()) or 24.0
    h, w = vr[0].shape[:2]
    line = max(14, h // 20)
    band = (line * len(queries) + 7) // 2 * 2  # even: codecs want even frame sizes
    target = join(out_uri, "renders", safe_name(video_id) + ".mp4")
    with tempfile.TemporaryDirectory(prefix="vbatch-render-") as tmp:
        local = os.path.join(tmp, "render.mp4")
        fourcc = cv2.VideoWriter_fourcc(*"mp4v")  # type: ignore[attr-defined]  # missing from cv2's stub
        writer = cv2.VideoWriter(local, fourcc, fps, (w, h + band))
        if not writer.isOpened():
            raise RuntimeError("cv2.VideoWriter (mp4v) could not be opened")
        try:
            for s in range(0, len(frame_indices), 24):
                chunk = frame_indices[s : s + 24]
                frames = vr.get_batch(chunk).asnumpy()
                for f, frame in zip(chunk, frames, strict=True):
                    canvas = np.zeros((h + band, w, 3), np.uint8)
                    img = frame.astype(np.float32)
                    for n, (qi, _) in enumerate(queries):
                        data = storage.read_bytes(mask_uri(out_uri, video_id, qi, f))
                        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
                        if decoded is None:
                            raise ValueError(f"unreadable mask PNG for frame {f}")
                        m = decoded > 0
                        img[m] = 0.5 * img[m] + 0.5 * np.asarray(
                            _PALETTE[n % len(_PALETTE)], np.float32
                        )
                    canvas[band:] = img.astype(np.uint8)
                    for n, (qi, q) in enumerate(queries):
                        color = _PALETTE[n % len(_PALETTE)]
                        cv2.putText(canvas, f"{qi}: {q}", (4, line * (n + 1)), cv2.FONT_HERSHEY_SIMPLEX,
                                    line / 30, color, 1, cv2.LINE_AA)  # fmt: skip
                    writer.write(cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
        finally:
            writer.release()
        storage.put_file(local, target)
    return target
