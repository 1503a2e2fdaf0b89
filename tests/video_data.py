"""MP4 files laid out by hand for the video tests: the top-level ISO boxes of a file, and a
"fast start" copy of one (its index first)."""

from __future__ import annotations

import struct


def boxes(data: bytes) -> dict[str, tuple[int, int]]:
    """Top-level ISO boxes: type → (offset, size)."""
    out, pos = {}, 0
    while pos < len(data):
        size, kind = struct.unpack(">I4s", data[pos : pos + 8])
        out[kind.decode()] = (pos, size)
        pos += size
    return out


def fast_start(data: bytes) -> bytes:
    """OpenCV's ``ftyp free mdat moov`` MP4 as ``ftyp moov mdat`` (the index first, as served for
    streaming; what ``ffmpeg -movflags faststart`` writes), its chunk offsets moved along."""
    layout = boxes(data)
    (f, fn), (m, mn), (d, dn) = layout["ftyp"], layout["moov"], layout["mdat"]
    moov = bytearray(data[m : m + mn])
    at = moov.index(b"stco")  # one track: one chunk offset table (32-bit offsets)
    (count,) = struct.unpack(">I", moov[at + 8 : at + 12])
    shift = (f + fn + mn) - d  # where mdat starts now, minus where it started
    for k in range(count):
        o = at + 12 + 4 * k
        moov[o : o + 4] = struct.pack(">I", struct.unpack(">I", moov[o : o + 4])[0] + shift)
    return data[f : f + fn] + bytes(moov) + data[d : d + dn]
