"""Stage 2, decode (CPU task per window): only that window's frames, resized to the network size."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import torch
import torchvision.transforms.functional as TF

from vbatch.models.rvos.config import MAX_SIDE, SHORT_SIDE
from vbatch.operators.cache import localize_video
from vbatch.operators.columns import encode_array, set_column
from vbatch.operators.manifest import ERROR
from vbatch.operators.storage import Storage
from vbatch.operators.video.columns import FRAMES, START, STOP
from vbatch.operators.video.container import describe_video_error, open_video


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
    return open_video(path).get_batch(list(range(start, stop))).asnumpy()


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
        path = None
        try:
            path = localize_video(storage, r["uri"])
            window = reader(path, r[START], r[STOP])
            if window.shape[0] != r[STOP] - r[START]:
                raise ValueError(f"decoded {window.shape[0]} frames, expected {r[STOP] - r[START]}")
            frames[i] = encode_array(resize_frames(window))
            del window
        except Exception as e:
            errors[i] = (
                f"frames {r[START]}-{r[STOP] - 1}: {describe_video_error(e, r['uri'], path)}"
            )
    batch = set_column(batch, FRAMES, pa.array(frames, pa.large_binary()))
    return set_column(batch, ERROR, pa.array(errors, pa.string()))
