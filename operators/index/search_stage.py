"""The search stage of ``reid search``'s batch job: an actor that maps the gallery once and turns
blocks of embedded queries into hit rows.

Kept apart from :mod:`vbatch.jobs.reid_search` so that a search actor imports the index code
only (numpy, pyarrow, faiss): not torch and the model stages, some 270 MB of private memory per
actor that the gallery search never uses.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa

from vbatch.models.registry import weights_version
from vbatch.operators.index.embeddings import vectors_from_arrow
from vbatch.operators.index.gallery import GalleryIndex
from vbatch.operators.storage import Storage, StorageOptions
from vbatch.schemas.errors import classify_error

#: queries per search call: large enough that faiss' per-call overhead and the re-rank's
#: gathers amortise (1024 x 1536 float32 = 6 MB of queries in a block)
SEARCH_BATCH_ROWS = 1024

HIT_FIELDS = [
    pa.field("query_id", pa.string()),
    pa.field("rank", pa.int32()),
    pa.field("image_id", pa.string()),
    pa.field("score", pa.float32()),
    pa.field("status", pa.string()),
    pa.field("error", pa.string()),
    pa.field("error_class", pa.string()),
    pa.field("model_version", pa.string()),
]
# columns of an embeddings/results row that are not passed through to the hits
# (nor the image job's own bookkeeping: task, size, time)
_NOT_PASSED = {
    "image_id",
    "status",
    "error",
    "error_class",
    "model_version",
    "embedding",
    "task",
    "width",
    "height",
    "processed_at",
}


class SearchStage:
    """Actor: opens the gallery (memory-mapped, cached per node) once, then turns batches of
    embedded queries into hit rows (``map_batches`` callable class, ``pyarrow`` batches)."""

    def __init__(
        self,
        index_uri: str,
        storage_options: StorageOptions,
        k: int,
        nprobe: int | None,
        rerank: int | None,
        allow_model_mismatch: bool,
        cache_root: str | None = None,
        threads: int | None = None,
    ) -> None:
        import faiss

        # Ray sets OMP_NUM_THREADS to the actor's logical CPUs (1 for 0.5): faiss would search on
        # one core of a node whose other cores the pipeline leaves idle most of the time
        faiss.omp_set_num_threads(threads or os.cpu_count() or 1)
        self.gallery = GalleryIndex.open(index_uri, Storage(storage_options), cache_root=cache_root)
        self.k, self.nprobe, self.rerank = k, nprobe, rerank
        self.allow_model_mismatch = allow_model_mismatch

    def _problems(self, batch: pa.Table) -> tuple[np.ndarray, list[str | None]]:
        n = batch.num_rows
        checked = vectors_from_arrow(batch.column("embedding"), self.gallery.info.dim)
        vectors, problems = checked.vectors, checked.problems
        names = batch.column_names
        status = batch.column("status").to_pylist() if "status" in names else ["ok"] * n
        errors = batch.column("error").to_pylist() if "error" in names else [None] * n
        versions = (
            batch.column("model_version").to_pylist() if "model_version" in names else [None] * n
        )
        gallery_version = self.gallery.info.model_version
        out: list[str | None] = []
        for st, err, problem, version in zip(status, errors, problems, versions, strict=True):
            if st != "ok":
                out.append(err or f"status {st!r}")
            elif problem is not None:
                out.append(problem)
            elif (
                not self.allow_model_mismatch
                and version is not None
                and gallery_version is not None
                and weights_version(version) != weights_version(gallery_version)
            ):
                out.append(
                    f"query from model_version {version!r}, the gallery from "
                    f"{gallery_version!r}: not comparable"
                )
            else:
                out.append(None)
        return vectors, out

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Hit rows of a batch of queries (``image_id``, ``embedding``, optional ``status``,
        ``error``, ``error_class``, ``model_version`` and passthrough columns)."""
        vectors, problems = self._problems(batch)
        good = [i for i, p in enumerate(problems) if p is None]
        scores = np.zeros((0, self.k), np.float32)
        ids: list[list[str | None]] = []
        if good:
            scores, ids = self.gallery.search(
                vectors[good], k=self.k, nprobe=self.nprobe, rerank=self.rerank
            )
        hit_of = {q: j for j, q in enumerate(good)}
        query_ids = batch.column("image_id").to_pylist()
        classes = (
            batch.column("error_class").to_pylist()
            if "error_class" in batch.column_names
            else [None] * batch.num_rows
        )
        versions = (
            batch.column("model_version").to_pylist()
            if "model_version" in batch.column_names
            else [None] * batch.num_rows
        )
        take: list[int] = []
        cols: dict[str, list[Any]] = {f.name: [] for f in HIT_FIELDS}
        for i, query_id in enumerate(query_ids):
            if i not in hit_of:
                take.append(i)
                row = {"query_id": query_id, "rank": None, "image_id": None, "score": None}
                row |= {"status": "error", "error": problems[i], "model_version": versions[i]}
                row["error_class"] = classes[i] or classify_error(problems[i])
                for name, value in row.items():
                    cols[name].append(value)
                continue
            j = hit_of[i]
            for r, image_id in enumerate(ids[j]):
                if image_id is None:  # the gallery holds fewer than k reachable vectors
                    break
                take.append(i)
                for name, value in (
                    ("query_id", query_id),
                    ("rank", r + 1),
                    ("image_id", image_id),
                    ("score", float(scores[j, r])),
                    ("status", "ok"),
                    ("error", None),
                    ("error_class", None),
                    ("model_version", versions[i]),
                ):
                    cols[name].append(value)
        hits = pa.table(cols, schema=pa.schema(HIT_FIELDS))
        passed = [c for c in batch.column_names if c not in _NOT_PASSED and not c.startswith("_")]
        carried = batch.select(passed).take(pa.array(take, pa.int64()))
        for name in passed:
            hits = hits.append_column(batch.schema.field(name), carried.column(name))
        return hits
