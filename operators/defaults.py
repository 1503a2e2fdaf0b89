"""The defaults of the operators' options, importable without the libraries the operators use.

``vbatch --help`` shows them and must answer at once (no numpy, Pillow, fsspec or Ray); the
operators import them from here, so each value still has one home.
"""

from __future__ import annotations

#: images with more pixels are refused (decompression bombs): Pillow's own limit
#: (``Image.MAX_IMAGE_PIXELS``, ≈ 179 Mpx, about 13k × 13k)
DEFAULT_MAX_PIXELS = 178_956_970

#: how the CPU stage decodes: ``exact`` (the reference preprocessing, bit for bit), ``fast``
#: (JPEGs at a reduced DCT scale) or ``gpu`` (JPEGs decoded and resized in the model actor)
DECODE_MODES = ("exact", "fast", "gpu")

#: default of ``StorageOptions.retry_seconds``: long enough to ride out a store's restart or a
#: short network partition, short enough that a dead store fails a nightly run within minutes
DEFAULT_RETRY_SECONDS = 180.0
