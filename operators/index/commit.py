"""Committing a generation of a gallery index: its files first, the manifest last.

Object stores have no multi-object transaction: the new generation's index file and parts are
uploaded under new names, then ``index.json`` is replaced (the commit point, as Iceberg and Delta
commit a snapshot), then files that neither the new nor the previous manifest names are removed
(the previous generation's stay for readers that opened its manifest). A crashed run leaves only
unreferenced files, which the next commit overwrites or removes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import faiss

from vbatch.operators.index.store import (
    MANIFEST_NAME,
    SHARDS_DIR,
    IndexInfo,
    files_of,
    is_generation_file,
    now_iso,
)
from vbatch.operators.storage import Storage, join

logger = logging.getLogger(__name__)


def commit(
    storage: Storage,
    index: faiss.Index,
    info: IndexInfo,
    previous: IndexInfo | None,
    workdir: Path,
    parts: Sequence[tuple[str, str]] = (),
) -> None:
    """Write the generation of ``info``: its index file, its parts, then the manifest (the commit
    point); then remove files that neither the new nor the previous manifest names.

    Args:
        storage: the storage layer.
        index: the generation's faiss index (its size goes into ``info``).
        info: the new manifest (``index_bytes``, ``bytes_per_vector``, ``updated_at`` are set).
        previous: the manifest it replaces (``None``: the first build at ``info.uri``).
        workdir: local scratch space for the index file.
        parts: ``(where a part is, its URI under the index)`` of the generation's id and refine
            parts; a part already at its URI (written there by a Ray task) is left as it is.
    """
    local_index = workdir / "index.faiss"
    faiss.write_index(index, str(local_index))
    info.index_bytes = local_index.stat().st_size
    info.bytes_per_vector = round(info.index_bytes / max(info.count, 1), 2)
    storage.put_file(local_index, join(info.uri, info.index_file))
    for where, uri in parts:
        if where != uri:
            storage.put_file(where, uri)
    info.updated_at = now_iso()
    storage.write_bytes(join(info.uri, MANIFEST_NAME), info.to_json().encode())

    keep = {join(info.uri, name) for name in files_of(info)}
    if previous is not None:  # readers holding the previous manifest can still open its files
        keep |= {join(info.uri, name) for name in files_of(previous)}
    for file_uri in storage.list_files(info.uri):
        if is_generation_file(info.uri, file_uri) and file_uri not in keep:
            logger.info("removing stale index file %s", file_uri)
            storage.delete(file_uri)
    # shard indexes of this run (merged into the index just written) and of crashed runs
    storage.delete(join(info.uri, SHARDS_DIR), recursive=True)
