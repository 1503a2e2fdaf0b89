"""Optional renders: an MP4 per video with every query's mask overlaid in its own colour.

The query texts are drawn with OpenCV's Hershey font, whose repertoire is printable ASCII: OpenCV
draws any other character as ``?``. No font with emoji ships with vbatch's dependencies, so
:func:`overlay_text` transliterates instead: accents are dropped (``é`` → ``e``) and any other
character is shown by its Unicode name (``🚲`` → ``[bicycle]``) or code point.
"""

from __future__ import annotations

import os
import tempfile
import unicodedata

import numpy as np

from vbatch.operators.cache import localize_video
from vbatch.operators.outputs import safe_name
from vbatch.operators.storage import Storage, join
from vbatch.operators.video.container import open_video
from vbatch.operators.video.write import mask_uri

_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
            (145, 30, 180), (70, 240, 240), (240, 50, 230)]  # fmt: skip
#: a character's Unicode name is shown when it is at most this long, else its code point
_MAX_NAME = 24


def overlay_text(text: str) -> str:
    """``text`` in the Hershey font's repertoire (printable ASCII), nothing silently lost.

    ASCII is kept as is; combining marks, joiners, variation selectors and emoji modifiers (skin
    tones) are dropped after NFKD decomposition (so ``é`` → ``e``, ``ﬁ`` → ``fi``); whitespace
    becomes a space; any other symbol becomes ``[its unicode name]`` in lower case (``🚲`` →
    ``[bicycle]``) and any other character ``[U+XXXX]``.
    """
    out = []
    for ch in unicodedata.normalize("NFKD", text):
        if " " <= ch <= "~":
            out.append(ch)
            continue
        category = unicodedata.category(ch)
        if category in ("Mn", "Me", "Cf", "Sk"):
            continue
        if ch.isspace():
            out.append(" ")
            continue
        # a symbol's name says what it is; a letter's name ("CYRILLIC SMALL LETTER KA") only spells
        name = unicodedata.name(ch, "") if category.startswith("S") else ""
        out.append(f"[{name.lower()}]" if name and len(name) <= _MAX_NAME else f"[U+{ord(ch):04X}]")
    return "".join(out)


def render_video(
    uri: str,
    video_id: str,
    queries: list[tuple[int, str]],
    frame_indices: list[int],
    out_uri: str,
    storage: Storage,
    fps: float | None = None,
    masks: dict[tuple[int, int], str] | None = None,
) -> str:
    """An MP4 of the video's frames with every query's mask overlaid in its own colour.

    Reads the video and the written masks window by window (memory: one window), draws the queries
    in a legend band above the frames (:func:`overlay_text`), writes
    ``<out>/renders/<video_id>.mp4`` (mp4v).

    Args:
        uri: the video. video_id: its id. queries: (query_index, text) to draw.
        frame_indices: the frames that have masks, in order. out_uri: the job's output folder.
        masks: each (query index, frame index)'s mask, as the result rows name it (products
            live in the folder of the run that wrote them); default: under ``out_uri/frames``.

    Returns:
        The render's URI.
    """
    import cv2

    path = localize_video(storage, uri)
    vr = open_video(path)
    fps = fps or float(vr.get_avg_fps()) or 24.0
    h, w = vr[0].shape[:2]
    line = max(14, h // 20)
    band = (line * len(queries) + 7) // 2 * 2  # even: codecs want even frame sizes
    labels = [f"{qi}: {overlay_text(q)}" for qi, q in queries]
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
                        where = (masks or {}).get((qi, f)) or mask_uri(out_uri, video_id, qi, f)
                        data = storage.read_bytes(where)
                        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
                        if decoded is None:
                            raise ValueError(f"unreadable mask PNG for frame {f}")
                        m = decoded > 0
                        img[m] = 0.5 * img[m] + 0.5 * np.asarray(
                            _PALETTE[n % len(_PALETTE)], np.float32
                        )
                    canvas[band:] = img.astype(np.uint8)
                    for n, label in enumerate(labels):
                        color = _PALETTE[n % len(_PALETTE)]
                        cv2.putText(canvas, label, (4, line * (n + 1)), cv2.FONT_HERSHEY_SIMPLEX,
                                    line / 30, color, 1, cv2.LINE_AA)  # fmt: skip
                    writer.write(cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
        finally:
            writer.release()
        storage.put_file(local, target)
    return target
