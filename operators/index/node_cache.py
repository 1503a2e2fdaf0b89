"""Node-local copies of a committed index: its file and refinement parts, downloaded once per node
and keyed by URI, size and ETag, then memory-mapped (or read) and checked against the manifest.

Mapping keeps a gallery's codes and vectors in the page cache (shared between the processes of a
node, evictable) instead of each process's heap; faiss ``contrib/ondisk.py`` maps its inverted
lists for the same reason. Figures per index type: ``docs/BENCHMARKS.md``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np

from vbatch.operators.index.refine import RefineVectors, npy_shape
from vbatch.operators.index.store import MANIFEST_NAME, REFINE_DIR, IndexInfo
from vbatch.operators.storage import Storage, is_remote, join

logger = logging.getLogger(__name__)


def _read_checked(local: Path, uri: str, info: IndexInfo, io_flags: int = 0) -> faiss.Index:
    """``faiss.read_index`` of a local copy of ``uri``, checked against the manifest."""
    size = local.stat().st_size
    if info.index_bytes is not None and size != info.index_bytes:
        what = "truncated" if size < info.index_bytes else "longer than written"
        raise ValueError(
            f"{uri}: {what} ({size} bytes, the manifest says {info.index_bytes}); rebuild the index"
        )
    try:
        index = faiss.read_index(str(local), io_flags)
    except RuntimeError as err:
        # faiss' C++ message names the local copy and a misleading errno
        reason = "empty file" if size == 0 else "truncated or not a faiss index file"
        raise ValueError(f"{uri}: cannot read the faiss index ({size} bytes): {reason}") from err
    if index.ntotal != info.count or index.d != info.dim:
        raise ValueError(
            f"{uri}: holds {index.ntotal} vectors of dim {index.d}, "
            f"the manifest says {info.count} of dim {info.dim}"
        )
    return index


@contextlib.contextmanager
def _missing_file(uri: str) -> Iterator[None]:
    """A file the manifest names but the store lacks: a damaged index, named."""
    try:
        yield
    except FileNotFoundError as err:
        raise ValueError(
            f"{uri}: missing, but {MANIFEST_NAME} names it; the index is damaged, rebuild it"
        ) from err


def load_faiss(
    info: IndexInfo, storage: Storage, cache_root: str | Path | None = None
) -> faiss.Index:
    """The index file of ``info`` read into memory (an index to modify), from the node-local
    copy of :func:`cached_index_file` (a local index is read in place).

    Raises:
        ValueError: the file is truncated, not a faiss index, or holds another count or dim;
            the message names the file's URI (never the local copy).
    """
    local = cached_index_file(info, storage, cache_root)
    return _read_checked(local, join(info.uri, info.index_file), info)


def _cache_dir(info: IndexInfo, cache_root: str | Path | None) -> Path:
    cache = Path(cache_root or os.environ.get("VBATCH_CACHE") or Path.home() / ".cache" / "vbatch")
    return cache / "indexes" / hashlib.sha256(info.uri.encode()).hexdigest()[:16]


def _cached(storage: Storage, uri: str, folder: Path) -> Path:
    """A local copy of ``uri`` under ``folder``, keyed by its URI, size and ETag (downloaded when
    missing); the path itself for a local ``uri``."""
    fs, path = storage.fs(uri)
    if not is_remote(uri):
        return Path(path)
    meta = fs.info(path)
    stamp = hashlib.sha256(repr((uri, meta.get("size"), meta.get("ETag"))).encode()).hexdigest()
    target = folder / f"{stamp[:16]}-{Path(path).name}"
    if target.is_file() and target.stat().st_size == meta.get("size"):
        return target
    storage.get_file(uri, target)  # atomic: a temporary name, then a rename
    logger.info("%s cached at %s", uri, target)
    return target


def _drop_others(folder: Path, pattern: str, keep: list[Path]) -> None:
    # a process that still maps an older copy keeps its pages (POSIX unlink semantics)
    for old in folder.glob(pattern):
        if old not in keep:
            old.unlink(missing_ok=True)


def cached_index_file(
    info: IndexInfo, storage: Storage, cache_root: str | Path | None = None
) -> Path:
    """A local file holding the index file of ``info``: itself when local, else a copy
    downloaded once per node into the cache (like model directories, :meth:`Storage.localize_dir`).

    The cache key is the file's URI, size and ETag. Older copies of the same index are removed
    when a new generation is cached: a process that still maps one keeps its pages (POSIX
    unlink semantics), and the next open maps the new file.
    """
    uri = join(info.uri, info.index_file)
    folder = _cache_dir(info, cache_root)
    with _missing_file(uri):
        target = _cached(storage, uri, folder)
        target.stat()  # a local index is its own file: it must exist
    if is_remote(uri):
        _drop_others(folder, "*.faiss", [target])
    return target


def open_refine(
    info: IndexInfo, storage: Storage, cache_root: str | Path | None = None
) -> RefineVectors | None:
    """The refinement vectors of ``info`` memory-mapped from node-local copies (cached like the
    index file; parts of earlier generations are reused, not downloaded again).

    Returns:
        ``None`` for a gallery without refine parts (built before re-ranking existed, or with
        re-ranking off).

    Raises:
        ValueError: a part that is not a 2-d ``.npy`` of the manifest's dim and dtype, or rows
            that do not add up to the gallery's count (naming the part or the index).
    """
    if not info.refine_parts:
        return None
    folder = _cache_dir(info, cache_root) / REFINE_DIR
    local = []
    for name in info.refine_parts:
        uri = join(info.uri, name)
        with _missing_file(uri):
            path = _cached(storage, uri, folder)
            path.stat()
        try:
            shape, dtype = npy_shape(path)
        except (ValueError, OSError) as err:
            raise ValueError(f"{uri}: not a readable .npy file ({err}); rebuild the index") from err
        if len(shape) != 2 or shape[1] != info.dim or dtype != info.refine_dtype:
            raise ValueError(
                f"{uri}: holds {dtype} {shape}, the manifest says {info.refine_dtype} rows of "
                f"dim {info.dim}; rebuild the index"
            )
        data_bytes = path.stat().st_size - _npy_data_offset(path)
        if data_bytes != shape[0] * shape[1] * np.dtype(dtype).itemsize:
            raise ValueError(f"{uri}: truncated ({data_bytes} data bytes for {shape}); rebuild")
        local.append(path)
    if any(is_remote(join(info.uri, n)) for n in info.refine_parts):
        _drop_others(folder, "*.npy", local)
    vectors = RefineVectors(local)
    if len(vectors) != info.count:
        raise ValueError(
            f"{info.uri}: refine parts hold {len(vectors)} vectors, the index {info.count}; "
            "rebuild the index"
        )
    return vectors


def _npy_data_offset(path: Path) -> int:
    with open(path, "rb") as fh:
        np.lib.format.read_magic(fh)
        np.lib.format.read_array_header_1_0(fh)
        return fh.tell()


# IO_FLAG_MMAP_IFC maps the arrays of faiss' in-memory format (flat codes, inverted lists) from
# the file instead of copying them to the heap; READ_ONLY because the mapping is shared with other
# processes and the page cache (measured per index type in docs/BENCHMARKS.md)
MMAP_FLAGS = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY


def map_faiss(
    info: IndexInfo, storage: Storage, cache_root: str | Path | None = None
) -> faiss.Index:
    """The index file of ``info`` memory-mapped read-only from a node-local copy: opening a
    gallery costs page cache (shared, evictable), not private memory.

    Falls back to reading into memory (with a log line) for an index type faiss cannot map.

    Raises:
        ValueError: as :func:`load_faiss`.
    """
    uri = join(info.uri, info.index_file)
    local = cached_index_file(info, storage, cache_root)
    try:
        return _read_checked(local, uri, info, MMAP_FLAGS)
    except ValueError:
        index = _read_checked(local, uri, info)  # a damaged file raises here again
        logger.info("%s: faiss cannot memory-map this index type; read into memory", uri)
        return index
