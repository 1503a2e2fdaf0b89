"""The last phase of a build or add, in one process (it holds the merged index): merge the shard
indexes, tune the defaults (a build), commit.

The shards' inverted lists are appended in shard order into lists sized once (:mod:`.shards`), so
the merge holds the merged codes and nothing else; the result is the index one process gets by
adding the whole table in order, byte for byte (tests/test_index_distributed.py).
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np

from vbatch.operators.index.commit import commit
from vbatch.operators.index.encode import ShardDone, Target
from vbatch.operators.index.executor import timed
from vbatch.operators.index.node_cache import load_faiss
from vbatch.operators.index.refine import RefineVectors
from vbatch.operators.index.shards import append_index, reserve_lists
from vbatch.operators.index.store import IndexInfo
from vbatch.operators.index.train import Trained
from vbatch.operators.index.tune import DEFAULT_TARGET_RECALL, tune_index
from vbatch.operators.storage import Storage, is_remote, join


def finish(
    target: Target,
    trained: Trained,
    done: list[ShardDone],
    info: IndexInfo,
    previous: IndexInfo | None,
    started: float,
    scratch: str | None,
    target_recall: float = DEFAULT_TARGET_RECALL,
) -> IndexInfo:
    """Merge the shards into the trained index (a build) or into the gallery (an add), tune the
    default ``nprobe`` and re-rank factor (a build), commit.

    Args:
        target: the run.
        trained: the trained index and the tuning queries.
        done: the shards' reports, in shard order.
        info: the new manifest; its timings, tuning and sizes are filled in here.
        previous: the manifest it replaces (an add merges into its index).
        started: ``time.time()`` at the start of the run (for its total seconds).
        scratch: the in-process executor's folder (``None`` on Ray).
        target_recall: recall@10 vs exact search that the default ``nprobe`` must reach.

    Returns:
        The committed manifest.
    """
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="vbatch-merge-") as tmp:
        workdir = Path(tmp)
        with timed("merge", seconds):
            if target.operation == "add" and previous is not None:
                # the copy the add's train phase fetched, when it ran in this process
                index = load_faiss(previous, target.storage, scratch or workdir)
            else:
                index = trained.load()
            index = merge_shards(index, target.storage, done, workdir)
        if target.operation == "build":
            with timed("tune", seconds):
                probe = trained.probe()
                for shard in done:
                    if probe is not None and shard.probe is not None:
                        probe.merge(*shard.probe)
                refine = _refine_vectors(target.storage, done, workdir)
                info.nprobe, info.rerank, tuned = tune_index(index, probe, refine, target_recall)
                info.tuned_recall = None if tuned is None else round(tuned, 4)
                del refine
            info.build_seconds.update(seconds)
            info.build_seconds["total"] = round(time.time() - started, 3)
        else:
            info.history[-1]["seconds"] = round(time.time() - started, 3)
        parts = []
        for shard in done:
            parts.append((shard.files.ids, join(target.uri, target.id_part(shard.number))))
            refine_part = target.refine_part(shard.number)
            if shard.files.refine is not None and refine_part is not None:
                parts.append((shard.files.refine, join(target.uri, refine_part)))
        commit(target.storage, index, info, previous, workdir, parts)
    return info


def merge_shards(
    dest: faiss.Index, storage: Storage, done: list[ShardDone], workdir: Path
) -> faiss.Index:
    """The shard indexes appended to ``dest`` in shard order, each fetched, mapped and appended
    in turn into lists sized once. Into an empty ``dest``, a single shard's index is the merged
    index itself: it is read instead (no list copies; and an HNSW index, which faiss cannot
    merge, builds in one process as before).

    Raises:
        RuntimeError: a shard does not start at the faiss id the merge has reached.
    """
    single = dest.ntotal == 0 and len(done) == 1
    sizes = [d.list_sizes for d in done if d.list_sizes is not None]
    if sizes and not single:
        reserve_lists(dest, np.sum(sizes, axis=0))
    for shard in done:
        if dest.ntotal != shard.first_id:
            raise RuntimeError(
                f"shard {shard.number} starts at faiss id {shard.first_id}, the merge at "
                f"{dest.ntotal}"
            )
        with _local(storage, shard.files.index, workdir / "shard.faiss") as local:
            if single:
                dest = faiss.read_index(str(local))
            else:
                append_index(dest, local)
    return dest


@contextlib.contextmanager
def _local(storage: Storage, where: str, copy: Path) -> Iterator[Path]:
    """A local file of ``where``: itself when local, else a downloaded copy removed afterwards."""
    if not is_remote(where):
        yield Path(where)
        return
    storage.get_file(where, copy)
    try:
        yield copy
    finally:
        copy.unlink(missing_ok=True)


def _refine_vectors(storage: Storage, done: list[ShardDone], workdir: Path) -> RefineVectors | None:
    """The shards' refinement parts, mapped (fetched first from object storage); ``None``
    without them."""
    parts = [d.files.refine for d in done if d.files.refine is not None]
    if not parts:
        return None
    local = []
    for i, where in enumerate(parts):
        remote = is_remote(where)
        local.append(
            storage.get_file(where, workdir / f"refine-{i:05d}.npy") if remote else Path(where)
        )
    return RefineVectors(local)
