"""Synthetic embeddings tables for the gallery index tests (written like ``reid embed`` does)."""

from __future__ import annotations

import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def clustered(n_ids: int, per_id: int, dim: int, seed: int = 0, noise: float = 0.6, draw_seed=None):
    """Unit vectors around ``n_ids`` random identity centres (like re-ID embeddings).

    ``draw_seed`` draws fresh images of the same identities (the centres depend on ``seed`` only).

    Returns ``(vectors (n_ids * per_id, dim) float32, identity (n,) int)``.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_ids, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    if draw_seed is not None:
        rng = np.random.default_rng(draw_seed)
    ident = np.repeat(np.arange(n_ids), per_id)
    x = centres[ident] + noise * rng.standard_normal((len(ident), dim)).astype(
        np.float32
    ) / math.sqrt(dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, ident


def write_embeddings(
    folder,
    vectors,
    prefix="img",
    model_version="reid-v1",
    n_files=2,
    error_every=0,
    start=0,
    file_name="part",
) -> list[str]:
    """Write an embeddings table like ``reid embed`` does (several files, optional error rows).

    Returns the image_ids of the ok rows in file order.
    """
    os.makedirs(folder, exist_ok=True)
    dim = vectors.shape[1]
    emb_type = pa.list_(pa.float32(), dim)
    ok_ids: list[str] = []
    for f, part in enumerate(np.array_split(np.arange(len(vectors)), n_files)):
        ids, status, embs = [], [], []
        for i in part:
            image_id = f"{prefix}-{start + i:06d}"
            if error_every and i % error_every == 0:
                ids.append(image_id + "-broken")
                status.append("error")
                embs.append(None)
            ids.append(image_id)
            status.append("ok")
            embs.append(vectors[i])
            ok_ids.append(image_id)
        table = pa.table(
            {
                "image_id": pa.array(ids, pa.string()),
                "status": pa.array(status, pa.string()),
                "error": pa.array(
                    [None if s == "ok" else "decode failed" for s in status], pa.string()
                ),
                "embedding": pa.array(
                    [None if e is None else e.tolist() for e in embs], type=emb_type
                ),
                "model_version": pa.array([model_version] * len(ids), pa.string()),
                "person_id": pa.array([0] * len(ids), pa.int64()),
            }
        )
        pq.write_table(
            table, os.path.join(folder, f"{file_name}-{f:03d}.parquet"), row_group_size=700
        )
    return ok_ids


def knn_recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(
        np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(found, truth, strict=True)])
    )
