"""Opening a video file with decord, and saying what is wrong with one it cannot open.

decord (FFmpeg) reports every unreadable file as ``Error reading <path>...`` (or ``av_read_frame
failed``), whether it is empty, a text file, a camera recording cut short before its index was
written or a "fast start" file (index first) cut short in its frames. When decord fails, the file
itself is looked at (size, magic bytes, the top-level boxes of an ISO media file) so that the
error row says which it is.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np

from vbatch.operators.cache import UnsafeKeyError
from vbatch.operators.redact import redact_uri
from vbatch.operators.storage import describe_read_error

#: magic bytes of the containers FFmpeg builds usually read: (offset, bytes, name)
_MAGIC = (
    (0, b"\x1a\x45\xdf\xa3", "Matroska/WebM"),
    (0, b"RIFF", "RIFF (AVI)"),
    (0, b"OggS", "Ogg"),
    (0, b"FLV", "FLV"),
    (0, b"\x00\x00\x01\xba", "MPEG program stream"),
    (0, b"\x00\x00\x01\xb3", "MPEG video"),
    (0, b"\x30\x26\xb2\x75\x8e\x66\xcf\x11", "ASF (WMV)"),
    (0, b"GIF8", "GIF"),
)
#: top-level box types of ISO base media files (MP4, MOV, 3GP)
_ISO_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot", b"uuid", b"styp"}
_TS_PACKET = 188


def open_video(path: str):
    """A ``decord.VideoReader`` on a local file, decoding on one thread."""
    # OpenCV first: decord's FFmpeg brings its own zlib, and when it is loaded first every PNG that
    # OpenCV reads or writes later in the process fails ("libpng error: bad parameters to zlib").
    # Ray reuses worker processes, so a plan task's decord would break a later render's masks.
    import cv2  # noqa: F401
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
    vr = open_video(path)
    n = len(vr)
    if n == 0:
        raise ValueError("the video has no frames")
    h, w = vr[0].shape[:2]
    times = np.asarray(vr.get_frame_timestamp(list(range(n))), np.float64)[:, 0]
    return VideoProbe(n, int(h), int(w), times)


def _iso_problem(f, size: int) -> str | None:
    """What is wrong with the top-level boxes of an ISO media file, or ``None`` if nothing shows."""
    pos = 0
    seen: list[str] = []  # the complete boxes before pos
    while pos + 8 <= size:
        f.seek(pos)
        length, kind = struct.unpack(">I4s", f.read(8))
        if length == 1:  # a 64-bit size follows the type
            if pos + 16 > size:
                break
            (length,) = struct.unpack(">Q", f.read(8))
        elif length == 0:  # the box runs to the end of the file
            length = size - pos
        if kind not in _ISO_BOXES and not (kind.isascii() and kind.isalnum()):
            seen_text = f" after {', '.join(seen)}" if seen else ""
            return f"corrupt: unreadable box at byte {pos}{seen_text}"
        if length < 8:
            return f"corrupt: box {kind.decode('latin-1')!r} at byte {pos} has size {length}"
        if pos + length > size:
            if kind == b"moov":
                return (
                    f"truncated: moov atom incomplete (the file ends at byte {size}, "
                    f"the atom at byte {pos + length})"
                )
            where = f"the file ends inside the {kind.decode('latin-1')!r} box, at byte {size} of"
            if "moov" not in seen:
                return f"truncated: moov atom missing ({where} {pos + length})"
            # the index came first (a "fast start" file, as served for streaming): the frames
            # it points past the end are gone
            return f"truncated: {where} {pos + length}"
        seen.append(kind.decode("latin-1"))
        pos += length
    if "moov" not in seen:
        return "truncated: moov atom missing"
    return None


def container_problem(path: str) -> str | None:
    """What the file at ``path`` shows to be wrong with it as a video, or ``None`` if nothing does.

    Only consulted after decord failed: ``None`` means the file looks like a container we know
    (or one we do not), so decord's own message is the best there is.
    """
    try:
        size = os.path.getsize(path)
    except OSError:
        return None
    if size == 0:
        return "empty file (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(2 * _TS_PACKET + 1)
        if head[4:8] in _ISO_BOXES:
            return _iso_problem(f, size)
    if any(head[o : o + len(m)] == m for o, m, _ in _MAGIC):
        return None
    if head[:1] == b"\x47" and head[_TS_PACKET : _TS_PACKET + 1] in (b"\x47", b""):
        return None  # MPEG transport stream: a sync byte every 188 bytes
    start = head[:16]
    if start.isascii() and all(32 <= b < 127 or b in (9, 10, 13) for b in start):
        shown = start.decode("ascii").strip()
        return f"not a video container (the file starts with text: {shown!r})"
    return f"not a video container (unknown magic bytes {start[:8].hex(' ')})"


def describe_video_error(e: BaseException, uri: str, path: str | None = None) -> str:
    """The error row's message for a video at ``uri`` that could not be read.

    Args:
        e: what was raised. uri: the video (for the message). path: the local file decord was
            given, looked at when decord fails (``None`` when the download itself failed).
    """
    if isinstance(e, UnsafeKeyError):
        return redact_uri(f"cannot read video {uri}: {e}")
    if path is not None and not isinstance(e, OSError):
        problem = container_problem(path)
        if problem is not None:
            return redact_uri(f"cannot read video {uri}: {problem}")
    return describe_read_error(e, uri, what="video ")
