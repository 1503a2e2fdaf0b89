"""The internal columns that carry a video's windows from stage to stage (prefix ``_vb_``)."""

from __future__ import annotations

from vbatch.schemas.videos import INTERNAL_PREFIX

#: list<string>, one per manifest query: why that query cannot run, null for one that runs
QUERY_ERRORS = f"{INTERNAL_PREFIX}query_errors"
WINDOW = f"{INTERNAL_PREFIX}window"  # int32: window number in the video; null on a failed video
START = f"{INTERNAL_PREFIX}start"  # int64: first frame of the window (index in the file)
STOP = f"{INTERNAL_PREFIX}stop"  # int64: one past its last frame
#: int64: the frames this window writes: [own_start, own_stop)
OWN_START = f"{INTERNAL_PREFIX}own_start"
OWN_STOP = f"{INTERNAL_PREFIX}own_stop"
HEIGHT = f"{INTERNAL_PREFIX}height"  # int32: original frame size
WIDTH = f"{INTERNAL_PREFIX}width"
FRAMES = f"{INTERNAL_PREFIX}frames"  # large_binary: (T, h, w, 3) uint8 .npy, resized frames
TIMES = f"{INTERNAL_PREFIX}times"  # list<float64>: timestamps of the owned frames
LOGITS = f"{INTERNAL_PREFIX}logits"  # large_binary: (Q, own_stop-own_start, h/4, w/4) float32 .npy
INPUT_H = f"{INTERNAL_PREFIX}input_h"  # int32: network input size (the resized frames')
INPUT_W = f"{INTERNAL_PREFIX}input_w"

#: window rows carry these manifest columns between stages (plus the internal ones above)
KEY_COLUMNS = ("video_id", "uri", "queries", "start_s", "end_s", "gt_mask_dir")
