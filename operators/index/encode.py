"""The add phase: one shard of the table encoded with the trained index, its files left for the
merge.

A shard's index holds only its own vectors' codes, with faiss ids from ``shard.first_id``; its id
part and refinement part are the rows of those ids. In process the files stay on this machine
until the commit uploads the parts (nothing crosses the store twice); a Ray task puts them in the
store, the shard index in the staging folder and the parts under their final names.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from vbatch.operators.index.indexes import innermost, ivf_or_none
from vbatch.operators.index.refine import NpyPartWriter
from vbatch.operators.index.shards import Shard, add_shard, list_sizes
from vbatch.operators.index.store import id_part_name, refine_part_name, shard_staging
from vbatch.operators.index.train import Trained, want_gpu
from vbatch.operators.storage import Storage, join

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """What the phases after training need (small and picklable: shipped to Ray tasks).

    Attributes:
        operation: ``"build"`` or ``"add"``.
        storage: the storage layer.
        uri: the index folder.
        generation: the generation being written.
        dim, model_version: of every vector added.
        batch_rows: Parquet rows per batch while adding.
        refine_dtype: dtype of the refinement parts (``None``: none are kept).
        sharded: parts named per shard (``ids/part-GGGGG-SSSSS.parquet``, a run of several
            workers) rather than per generation only.
        use_gpu: whether a shard may add on a GPU of its process (``"auto"``, ``True``,
            ``False``).
    """

    operation: str
    storage: Storage
    uri: str
    generation: int
    dim: int
    model_version: str | None
    batch_rows: int
    refine_dtype: str | None
    sharded: bool
    use_gpu: bool | str = False

    def id_part(self, shard: int) -> str:
        """The id part of shard number ``shard``, relative to the index folder."""
        return id_part_name(self.generation, shard if self.sharded else None)

    def refine_part(self, shard: int) -> str | None:
        """Its refinement part (``None``: none are kept)."""
        if self.refine_dtype is None:
            return None
        return refine_part_name(self.generation, shard if self.sharded else None)


@dataclass(frozen=True)
class ShardFiles:
    """Where a shard's files are: local paths, or URIs in the store."""

    index: str
    ids: str
    refine: str | None

    def paths(self) -> list[str]:
        return [self.index, self.ids, *([] if self.refine is None else [self.refine])]


@dataclass(frozen=True)
class ShardDone:
    """What a shard reports back.

    Attributes:
        number: the shard's position.
        first_id: faiss id of its first vector.
        added: vectors it encoded.
        probe: ``(scores, ids, self_ids)`` of the tuning probe over its vectors (``None``: none).
        list_sizes: entries per inverted list of its index (IVF only), to size the merge.
        files: its shard index, id part and refinement part.
    """

    number: int
    first_id: int
    added: int
    probe: tuple[np.ndarray, np.ndarray, np.ndarray] | None
    list_sizes: np.ndarray | None
    files: ShardFiles


def encode_shard(target: Target, trained: Trained, scratch: str | None, shard: Shard) -> ShardDone:
    """Encode the shard's rows with the trained index (holding one batch of vectors and the
    shard's codes, never more) and write its index, id part and refinement part.

    Args:
        target: the run.
        trained: the trained index and tuning queries.
        scratch: a folder kept until the commit (in process): the files stay there; ``None`` (a
            Ray task): they go to the store. A retried task rewrites them whole, so a retry never
            duplicates anything.
        shard: the rows.

    Returns:
        :class:`ShardDone`.
    """
    index = trained.load()
    probe = trained.probe()
    with _workdir(scratch, shard) as workdir:
        local = ShardFiles(
            str(workdir / "shard.faiss"),
            str(workdir / "ids.parquet"),
            str(workdir / "refine.npy") if target.refine_dtype is not None else None,
        )
        adder = _adder(index, want_gpu(target.use_gpu))
        with contextlib.ExitStack() as stack:
            refine = None
            if local.refine is not None and target.refine_dtype is not None:
                writer = NpyPartWriter(local.refine, target.dim, target.refine_dtype)
                refine = stack.enter_context(writer)
            added = add_shard(
                adder,
                shard,
                target.storage,
                target.dim,
                target.batch_rows,
                Path(local.ids),
                target.model_version,
                probe,
                refine,
            )
        index = _back_to_cpu(index, adder)
        faiss.write_index(index, local.index)
        files = local if scratch is not None else _put(target, shard, local)
    partial = None if probe is None else probe.partial()
    return ShardDone(shard.number, shard.first_id, added, partial, list_sizes(index), files)


@contextlib.contextmanager
def _workdir(scratch: str | None, shard: Shard) -> Iterator[Path]:
    if scratch is not None:
        folder = Path(scratch, f"shard-{shard.number:05d}")
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="vbatch-shard-") as tmp:
        yield Path(tmp)


def _put(target: Target, shard: Shard, local: ShardFiles) -> ShardFiles:
    """Upload a shard's files: the index to the staging folder, the parts to their final names."""
    refine = target.refine_part(shard.number)
    files = ShardFiles(
        join(shard_staging(target.uri, target.generation), f"shard-{shard.number:05d}.faiss"),
        join(target.uri, target.id_part(shard.number)),
        None if refine is None else join(target.uri, refine),
    )
    for src, dst in zip(local.paths(), files.paths(), strict=True):
        target.storage.put_file(src, dst)
    return files


def _adder(index: faiss.Index, gpu: bool) -> faiss.Index:
    """The index to call ``add`` on: a GPU clone where faiss supports the type, else itself."""
    if not gpu or ivf_or_none(index) is None:
        return index
    if isinstance(innermost(index), faiss.IndexIVFRaBitQ):
        logger.info("adding on CPU: faiss has no GPU RaBitQ index (training used the GPU)")
        return index
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except (RuntimeError, AttributeError) as err:  # e.g. PQ sub-quantizer counts the GPU lacks
        logger.warning("adding on CPU: faiss cannot move %s to the GPU (%s)", type(index), err)
        return index


def _back_to_cpu(index: faiss.Index, adder: faiss.Index) -> faiss.Index:
    return index if adder is index else faiss.index_gpu_to_cpu(adder)
