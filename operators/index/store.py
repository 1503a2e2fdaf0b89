"""The stored form of a gallery index: ``index.json``, index files by generation, the id map.

Layout under the index URI (every object written through :class:`vbatch.operators.storage.Storage`)::

    index.json                 manifest and commit point (factory, dim, count, nprobe, history…)
    index-00003.faiss          the FAISS index of generation 3
    ids/part-00000.parquet     faiss_id int64, image_id string, model_version string
    ids/part-00003.parquet     rows added by generation 3 (an ``add_to_index``)

Object stores have no multi-object transaction, so every build or add writes a new *generation*
(new index file, new id part) and only then replaces ``index.json``; a reader that opened the old
manifest still finds the files it names, because the previous generation's files are kept until
the next commit. A crashed run leaves unreferenced files that the next commit overwrites or
removes; a repeated run therefore never duplicates anything (the habits of faiss
``contrib/ondisk.py`` and ``contrib/big_batch_search.py``).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa

from vbatch.operators.index.embeddings import open_parquet
from vbatch.operators.storage import Storage, join

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "index.json"
IDS_DIR = "ids"
_INDEX_FILE_RE = re.compile(r"index-(\d{5})\.faiss$")
_ID_PART_RE = re.compile(r"part-(\d{5})\.parquet$")

ID_MAP_SCHEMA = pa.schema(
    [
        pa.field("faiss_id", pa.int64(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("model_version", pa.string()),
    ]
)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def vbatch_version() -> str:
    try:
        from importlib.metadata import version

        return version("vbatch")
    except Exception:  # not installed (running from a checkout)
        return "unknown"


@dataclass
class IndexInfo:
    """The manifest ``index.json`` of one gallery index (plus what the last operation did).

    Attributes:
        uri: where the index lives (not stored; the manifest can be moved with its files).
        factory: ``faiss.index_factory`` string.
        dim: vector dimension.
        count: vectors in the index (== rows of the id map).
        model_version: the re-ID model version of every vector.
        nprobe: default inverted lists visited per query (``None`` for non-IVF indexes).
        tuned_recall: 10-recall@10 vs exact search measured at build time with ``nprobe``.
        bytes_per_vector: serialized index size / count (codes, ids, quantizers included).
        generation: increases with every build or add; names the index file and id part.
        index_file: index file name, relative to ``uri``.
        id_parts: id map Parquet files, relative to ``uri``, in ``faiss_id`` order.
        plan_reason: why this factory (auto choice or ``"explicit factory"``).
        memory_budget: bytes the build was asked to fit (``None``: no limit).
        build_seconds: ``train``, ``add``, ``tune`` and ``total`` seconds of the build.
        created_at, updated_at: UTC ISO timestamps.
        vbatch_version, faiss_version: software that wrote it.
        history: one dict per build/add: generation, operation, source URI, added, skipped…
        added: vectors the operation that returned this info added (not stored).
        skipped_existing: image_ids that operation skipped because they were indexed already.
    """

    uri: str
    factory: str
    dim: int
    count: int
    model_version: str | None
    nprobe: int | None
    tuned_recall: float | None
    bytes_per_vector: float
    generation: int
    index_file: str
    id_parts: list[str]
    plan_reason: str = ""
    memory_budget: int | None = None
    build_seconds: dict[str, float] = field(default_factory=dict)
    created_at: str = ""
    updated_at: str = ""
    vbatch_version: str = ""
    faiss_version: str = ""
    metric: str = "inner_product"
    format_version: int = FORMAT_VERSION
    history: list[dict[str, Any]] = field(default_factory=list)
    added: int = 0
    skipped_existing: int = 0

    _NOT_STORED = ("uri", "added", "skipped_existing")

    def to_json(self) -> str:
        data = {k: v for k, v in asdict(self).items() if k not in self._NOT_STORED}
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, uri: str) -> IndexInfo:
        data = json.loads(text)
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{uri}: unsupported index format {data.get('format_version')!r}")
        known = {f for f in cls.__dataclass_fields__ if f not in cls._NOT_STORED}
        return cls(uri=uri, **{k: v for k, v in data.items() if k in known})


def read_info(uri: str, storage: Storage) -> IndexInfo:
    """The manifest of the index at ``uri``; ``FileNotFoundError`` if there is none."""
    return IndexInfo.from_json(storage.read_bytes(join(uri, MANIFEST_NAME)), uri)


def try_read_info(uri: str, storage: Storage) -> IndexInfo | None:
    try:
        return read_info(uri, storage)
    except FileNotFoundError:
        return None


def index_name(generation: int) -> str:
    return f"index-{generation:05d}.faiss"


def id_part_name(generation: int) -> str:
    return f"{IDS_DIR}/part-{generation:05d}.parquet"


def commit(
    storage: Storage,
    index: faiss.Index,
    id_part: Path | None,
    info: IndexInfo,
    previous: IndexInfo | None,
    workdir: Path,
) -> None:
    """Upload the generation's index and id part, then the manifest (the commit point), then
    remove files that neither the new nor the previous manifest names."""
    local_index = workdir / "index.faiss"
    faiss.write_index(index, str(local_index))
    info.bytes_per_vector = round(local_index.stat().st_size / max(info.count, 1), 2)
    storage.put_file(local_index, join(info.uri, info.index_file))
    if id_part is not None:
        storage.put_file(id_part, join(info.uri, id_part_name(info.generation)))
    info.updated_at = now_iso()
    storage.write_bytes(join(info.uri, MANIFEST_NAME), info.to_json().encode())

    keep = {join(info.uri, name) for name in [info.index_file, *info.id_parts]}
    if previous is not None:  # readers holding the previous manifest can still open its files
        keep |= {join(info.uri, name) for name in [previous.index_file, *previous.id_parts]}
    for file_uri in storage.list_files(info.uri):
        ours = (
            _INDEX_FILE_RE.search(file_uri) and join(info.uri, Path(file_uri).name) == file_uri
        ) or (
            _ID_PART_RE.search(file_uri)
            and join(info.uri, IDS_DIR, Path(file_uri).name) == file_uri
        )
        if ours and file_uri not in keep:
            logger.info("removing stale index file %s", file_uri)
            storage.delete(file_uri)


_ID_MAP_READ = pa.schema([ID_MAP_SCHEMA.field("faiss_id"), ID_MAP_SCHEMA.field("image_id")])


def read_id_map(info: IndexInfo, storage: Storage) -> pa.Table:
    """``faiss_id, image_id`` of every id part, checked to be the faiss ids ``0..count-1``.

    Read with ``ParquetFile`` rather than the dataset API: for a 200k gallery the dataset reader
    left ~75 MB resident (mostly decoding buffers the allocator keeps) against ~30 for this.
    """
    tables = [
        open_parquet(storage, join(info.uri, name))
        .read(columns=_ID_MAP_READ.names)
        .cast(_ID_MAP_READ)
        for name in info.id_parts
    ]
    ids = pa.concat_tables(tables).combine_chunks() if tables else _ID_MAP_READ.empty_table()
    expected = np.arange(info.count, dtype=np.int64)
    got = ids.column("faiss_id").to_numpy()
    if len(got) != info.count or not np.array_equal(got, expected):
        raise ValueError(
            f"{info.uri}: id map has {len(got)} rows that are not faiss ids 0..{info.count - 1}; "
            "the index is damaged, rebuild it"
        )
    return ids


def load_faiss(info: IndexInfo, storage: Storage, workdir: Path) -> faiss.Index:
    local = storage.get_file(join(info.uri, info.index_file), workdir / "index.faiss")
    index = faiss.read_index(str(local))
    if index.ntotal != info.count or index.d != info.dim:
        raise ValueError(
            f"{info.uri}: {info.index_file} holds {index.ntotal} vectors of dim {index.d}, "
            f"the manifest says {info.count} of dim {info.dim}"
        )
    return index
