"""The stored form of a gallery index: ``index.json``, index files by generation, the id map.

Layout under the index URI (every object written through :class:`vbatch.operators.storage.Storage`)::

    index.json                 manifest and commit point (factory, dim, count, nprobe, history…)
    index-00003.faiss          the FAISS index of generation 3
    ids/part-00000.parquet     faiss_id int64, image_id string, model_version string
    ids/part-00003.parquet     rows added by generation 3 (an ``add_to_index``)
    ids/part-00004-00001.parquet  shard 1 of generation 4 (a build or add on Ray workers)
    refine/part-00000.npy      full-precision vectors for re-ranking (when the plan keeps them)
    _shards/00004/             a distributed run's shard indexes until its commit (then removed)

Every build or add writes a new *generation* (new index file, new parts) and only then replaces
``index.json`` (:mod:`.commit`); a reader that opened the old manifest still finds the files it
names. A repeated run therefore never duplicates anything (the habits of faiss
``contrib/ondisk.py`` and ``contrib/big_batch_search.py``). Node-local copies of the files, mapped
for search: :mod:`.node_cache`.
"""

from __future__ import annotations

import json
import re
from dataclasses import MISSING, asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from vbatch.operators.index.embeddings import open_parquet
from vbatch.operators.index.indexes import METRICS
from vbatch.operators.storage import Storage, join

FORMAT_VERSION = 1
MANIFEST_NAME = "index.json"
IDS_DIR = "ids"
REFINE_DIR = "refine"
SHARDS_DIR = "_shards"
_INDEX_FILE_RE = re.compile(r"index-(\d{5})\.faiss$")
_ID_PART_RE = re.compile(r"part-(\d{5})(?:-\d{5})?\.parquet$")
_REFINE_PART_RE = re.compile(r"part-(\d{5})(?:-\d{5})?\.npy$")

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
        index_bytes: size of ``index_file`` (``None`` in manifests written before it was kept);
            a shorter file is reported as truncated.
        generation: increases with every build or add; names the index file and id part.
        index_file: index file name, relative to ``uri``.
        id_parts: id map Parquet files, relative to ``uri``, in ``faiss_id`` order.
        plan_reason: why this factory (auto choice or ``"explicit factory"``).
        memory_budget: bytes the build was asked to fit (``None``: no limit).
        build_seconds: ``train``, ``add``, ``tune`` and ``total`` seconds of the build.
        train_threads: OpenMP threads the index was trained with, wherever it was trained
            (``None``: an index without training, or a manifest written before it was kept).
        created_at, updated_at: UTC ISO timestamps.
        vbatch_version, faiss_version: software that wrote it.
        history: one dict per build/add: generation, operation, source URI, added, skipped…
        added: vectors the operation that returned this info added (not stored).
        skipped_existing: image_ids that operation skipped because they were indexed already.
        refine_parts: full-precision vectors for re-ranking, ``.npy`` files relative to ``uri``
            in faiss-id order, one per generation (empty: no re-ranking, as in galleries built
            before it existed).
        refine_dtype: ``"float32"`` or ``"float16"`` (``None`` without refine parts).
        rerank: default re-rank factor ``r``: searches re-rank the compact index's top
            ``k x r`` with the refinement vectors (``None`` without refine parts).
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
    train_threads: int | None = None
    created_at: str = ""
    updated_at: str = ""
    vbatch_version: str = ""
    faiss_version: str = ""
    metric: str = "inner_product"
    index_bytes: int | None = None
    format_version: int = FORMAT_VERSION
    history: list[dict[str, Any]] = field(default_factory=list)
    refine_parts: list[str] = field(default_factory=list)
    refine_dtype: str | None = None
    rerank: int | None = None
    added: int = 0
    skipped_existing: int = 0

    _NOT_STORED = ("uri", "added", "skipped_existing")

    def to_json(self) -> str:
        data = {k: v for k, v in asdict(self).items() if k not in self._NOT_STORED}
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, uri: str) -> IndexInfo:
        """Parse and check a manifest; ``uri`` is the index folder (named in every error).

        Raises:
            ValueError: not JSON, an unsupported format, a missing field or a value no index
                can have (unknown metric, ``nprobe < 1``, file names outside the layout…).
        """
        where = join(uri, MANIFEST_NAME)
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{where}: not valid JSON ({err}); the manifest is damaged") from err
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{where}: unsupported index format {data.get('format_version')!r}")
        known = {f for f in cls.__dataclass_fields__ if f not in cls._NOT_STORED}
        required = {
            name
            for name, f in cls.__dataclass_fields__.items()
            if name in known and f.default is MISSING and f.default_factory is MISSING  # type: ignore[misc]
        }
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing}; the manifest is damaged")
        info = cls(uri=uri, **{k: v for k, v in data.items() if k in known})
        problem = info._problem()
        if problem:
            raise ValueError(f"{where}: {problem}; the manifest is damaged")
        return info

    def _problem(self) -> str | None:
        """What makes this manifest impossible (``None``: nothing found)."""

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not isinstance(self.metric, str) or self.metric not in METRICS:
            return f"unknown metric {self.metric!r} (expected one of {sorted(METRICS)})"
        if not isinstance(self.factory, str) or not self.factory:
            return f"factory must be a faiss factory string, got {self.factory!r}"
        if self.model_version is not None and not isinstance(self.model_version, str):
            return f"model_version must be a string or null, got {self.model_version!r}"
        if not is_int(self.dim) or self.dim < 1:
            return f"dim must be a positive integer, got {self.dim!r}"
        if not is_int(self.count) or self.count < 0:
            return f"count must be an integer >= 0, got {self.count!r}"
        if self.nprobe is not None and (not is_int(self.nprobe) or self.nprobe < 1):
            return f"nprobe must be an integer >= 1 or null, got {self.nprobe!r}"
        if not is_int(self.generation) or self.generation < 0:
            return f"generation must be an integer >= 0, got {self.generation!r}"
        if self.train_threads is not None and (
            not is_int(self.train_threads) or self.train_threads < 1
        ):
            return f"train_threads must be an integer >= 1 or null, got {self.train_threads!r}"
        if self.index_bytes is not None and (not is_int(self.index_bytes) or self.index_bytes < 0):
            return f"index_bytes must be an integer >= 0 or null, got {self.index_bytes!r}"
        # file names stay inside the index folder (no "../" from a tampered manifest)
        if not isinstance(self.index_file, str) or not _INDEX_FILE_RE.fullmatch(self.index_file):
            return f"index_file {self.index_file!r} is not index-NNNNN.faiss"
        if not isinstance(self.id_parts, list) or not all(
            isinstance(p, str) and re.fullmatch(rf"{IDS_DIR}/part-\d{{5}}(-\d{{5}})?\.parquet", p)
            for p in self.id_parts
        ):
            return f"id_parts {self.id_parts!r} are not a list of ids/part-NNNNN[-SSSSS].parquet"
        if not isinstance(self.refine_parts, list) or not all(
            isinstance(p, str) and re.fullmatch(rf"{REFINE_DIR}/part-\d{{5}}(-\d{{5}})?\.npy", p)
            for p in self.refine_parts
        ):
            return (
                f"refine_parts {self.refine_parts!r} are not a list of "
                "refine/part-NNNNN[-SSSSS].npy"
            )
        if self.refine_parts and self.refine_dtype not in ("float32", "float16"):
            return f"refine_dtype must be float32 or float16, got {self.refine_dtype!r}"
        if self.rerank is not None and (not is_int(self.rerank) or self.rerank < 1):
            return f"rerank must be an integer >= 1 or null, got {self.rerank!r}"
        if not isinstance(self.history, list):
            return f"history must be a list, got {type(self.history).__name__}"
        return None


def read_info(uri: str, storage: Storage) -> IndexInfo:
    """The manifest of the index at ``uri``.

    Raises:
        FileNotFoundError: there is no ``index.json`` at ``uri`` (no index there).
        ValueError: the manifest is damaged (see :meth:`IndexInfo.from_json`).
    """
    where = join(uri, MANIFEST_NAME)
    try:
        data = storage.read_bytes(where)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"no gallery index at {uri}: {where} does not exist (build one with `vbatch reid "
            "index`)"
        ) from err
    return IndexInfo.from_json(data, uri)


def try_read_info(uri: str, storage: Storage) -> IndexInfo | None:
    try:
        return read_info(uri, storage)
    except FileNotFoundError:
        return None


def index_name(generation: int) -> str:
    return f"index-{generation:05d}.faiss"


def _part_suffix(generation: int, shard: int | None) -> str:
    return f"{generation:05d}" if shard is None else f"{generation:05d}-{shard:05d}"


def id_part_name(generation: int, shard: int | None = None) -> str:
    """``ids/part-GGGGG.parquet``; a distributed build writes one part per shard,
    ``ids/part-GGGGG-SSSSS.parquet`` (rows in faiss-id order across the shards)."""
    return f"{IDS_DIR}/part-{_part_suffix(generation, shard)}.parquet"


def refine_part_name(generation: int, shard: int | None = None) -> str:
    """``refine/part-GGGGG.npy`` (``-SSSSS`` per shard, as :func:`id_part_name`)."""
    return f"{REFINE_DIR}/part-{_part_suffix(generation, shard)}.npy"


def shard_staging(uri: str, generation: int) -> str:
    """Where a distributed build's workers leave their shard indexes until the merge."""
    return join(uri, SHARDS_DIR, f"{generation:05d}")


def files_of(info: IndexInfo) -> list[str]:
    """Every file the manifest ``info`` names, relative to its folder."""
    return [info.index_file, *info.id_parts, *info.refine_parts]


def is_generation_file(uri: str, file_uri: str) -> bool:
    """Whether ``file_uri`` is one of the layout's generation files of the index at ``uri``: an
    index file, id part or refine part, in its folder (other files there are not the index's)."""
    name = Path(file_uri).name
    return bool(
        (_INDEX_FILE_RE.search(file_uri) and join(uri, name) == file_uri)
        or (_ID_PART_RE.search(file_uri) and join(uri, IDS_DIR, name) == file_uri)
        or (_REFINE_PART_RE.search(file_uri) and join(uri, REFINE_DIR, name) == file_uri)
    )


_ID_MAP_READ = pa.schema([ID_MAP_SCHEMA.field("faiss_id"), ID_MAP_SCHEMA.field("image_id")])


def read_id_map(info: IndexInfo, storage: Storage) -> pa.Table:
    """``faiss_id, image_id`` of every id part, checked to be the faiss ids ``0..count-1``.

    Read with ``ParquetFile`` rather than the dataset API: for a 200k gallery the dataset reader
    left ~75 MB resident (mostly decoding buffers the allocator keeps) against ~30 for this.
    """
    tables = []
    for name in info.id_parts:
        part_uri = join(info.uri, name)
        try:
            part = open_parquet(storage, part_uri).read(columns=_ID_MAP_READ.names)
            tables.append(part.cast(_ID_MAP_READ))
        except FileNotFoundError as err:
            raise ValueError(
                f"{part_uri}: missing, but {MANIFEST_NAME} names it; the index is damaged, "
                "rebuild it"
            ) from err
        except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError) as err:
            raise ValueError(
                f"{part_uri}: unreadable id map part ({err}); rebuild the index"
            ) from err
    ids = pa.concat_tables(tables).combine_chunks() if tables else _ID_MAP_READ.empty_table()
    expected = np.arange(info.count, dtype=np.int64)
    got = ids.column("faiss_id").to_numpy()
    if len(got) != info.count or not np.array_equal(got, expected):
        raise ValueError(
            f"{info.uri}: id map has {len(got)} rows that are not faiss ids 0..{info.count - 1}; "
            "the index is damaged, rebuild it"
        )
    return ids
