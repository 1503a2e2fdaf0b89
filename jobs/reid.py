"""``vbatch reid``: embed person crops, build/extend a FAISS gallery index, search it, evaluate.

* ``embed`` is the image job of :mod:`vbatch.jobs.segment` with the ``reid`` model: one row per manifest
  row with an L2-normalised 1536-d ``embedding`` (null on error rows), under ``<out>/results/``.
* ``index``/``add`` build and extend the gallery (:mod:`vbatch.operators.faiss_index`).
* ``search`` embeds query images with the same model and returns the top-k gallery ids.
* ``eval`` scores a query table against a gallery table (Market-1501 protocol,
  :mod:`vbatch.operators.reid_eval`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from vbatch.jobs.segment import ImageJobConfig, JobSummary, run_image_job
from vbatch.jobs.summary import RunClock
from vbatch.models import load_model
from vbatch.operators.decode import decode_image
from vbatch.operators.faiss_index import GalleryIndex
from vbatch.operators.storage import Storage, join

logger = logging.getLogger(__name__)


def run_embed(cfg: ImageJobConfig, clock: RunClock | None = None) -> JobSummary:
    """Embeddings for every row of an image manifest: the image job with the ``reid`` model,
    whatever ``cfg.task`` says (``cfg`` itself is left as it is)."""
    return run_image_job(dataclasses.replace(cfg, task="reid"), clock, command="reid embed")


@dataclass
class SearchHit:
    query: str
    rank: int
    image_id: str | None
    score: float


def embed_images(
    uris: list[str], model_dir: str, storage: Storage, batch_size: int = 32
) -> np.ndarray:
    """Embed a few query images on this machine (no Ray); (Q, D) float32, L2-normalised."""
    predictor = load_model("reid", storage.localize_dir(model_dir))
    vectors = []
    for start in range(0, len(uris), batch_size):
        images = [decode_image(storage.read_bytes(u)) for u in uris[start : start + batch_size]]
        vectors.extend(predictor.predict(images))
    out = np.stack(vectors).astype(np.float32)
    return out / np.linalg.norm(out, axis=1, keepdims=True).clip(min=1e-12)


def search_table(
    index: GalleryIndex, query_ids: list[str], embeddings: np.ndarray, k: int
) -> pa.Table:
    """Top-k hits per query as a long table: ``query_id, rank, image_id, score``."""
    scores, ids = index.search(embeddings, k=k)
    rows = [
        {"query_id": q, "rank": r + 1, "image_id": ids[i][r], "score": float(scores[i, r])}
        for i, q in enumerate(query_ids)
        for r in range(len(ids[i]))
        if ids[i][r] is not None
    ]
    schema = pa.schema(
        [
            ("query_id", pa.string()),
            ("rank", pa.int32()),
            ("image_id", pa.string()),
            ("score", pa.float32()),
        ]
    )
    return pa.Table.from_pylist(rows, schema=schema)


def query_embeddings_from_table(table: pa.Table) -> tuple[list[str], np.ndarray]:
    """(ids, vectors) of the ``ok`` rows of an embeddings table."""
    ok = table.filter(pa.compute.equal(table.column("status"), "ok"))
    vectors = np.stack(ok.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    return ok.column("image_id").to_pylist(), vectors


def write_parquet(table: pa.Table, uri: str, storage: Storage) -> str:
    import io

    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    target = uri if uri.endswith(".parquet") else join(uri, "search.parquet")
    storage.write_bytes(target, buf.getvalue())
    return target
