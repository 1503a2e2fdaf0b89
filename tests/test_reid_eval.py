"""Market-1501 mAP / CMC on hand-made rankings whose scores are computed by hand below."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from vbatch.operators.reid_eval import evaluate

# Similarity of each query (rows) to each gallery image (columns), chosen by hand.
#                 g0    g1    g2    g3    g4    g5    g6
SIMS = np.array(
    [
        [0.50, 0.90, 0.70, 0.80, 0.95, 0.10, 0.30],  # q0: person 1, camera 1
        [0.20, 0.10, 0.90, 0.40, 0.30, 0.60, 0.70],  # q1: person 2, camera 1
        [0.10, 0.10, 0.10, 0.10, 0.10, 0.10, 0.10],  # q2: person 3, camera 2 (not in gallery)
    ]
)
QUERY_PID, QUERY_CAM = [1, 2, 3], [1, 1, 2]
#              g0 g1 g2 g3 g4  g5 g6
GALLERY_PID = [1, 1, 2, 0, -1, 2, 4]  # g3: distractor (0), g4: junk (-1)
GALLERY_CAM = [2, 1, 2, 3, 2, 3, 1]
# q0: g1 (person 1, camera 1) is removed (same identity, same camera), g4 (junk) is removed.
#     Ranking: g3 .80 (distractor, wrong), g2 .70 (wrong), g0 .50 (RIGHT), g6 .30, g5 .10.
#     First match at rank 3 -> CMC@1 = 0, CMC@5 = 1;  AP = precision@3 = 1/3.
#     (Without the protocol's removals g4 and g1 would lead and q0 would score rank 2.)
# q1: g4 (junk) is removed; nothing of person 2 is on camera 1.
#     Ranking: g2 .90 (RIGHT), g6 .70, g5 .60 (RIGHT), g3 .40, g0 .20, g1 .10.
#     First match at rank 1;  AP = (1/1 + 2/3) / 2 = 5/6.
# q2: person 3 has no gallery image: skipped, counted in num_query only.
# mAP = (1/3 + 5/6) / 2 = 7/12; CMC@1 = 1/2 (q1 only); CMC@5 = CMC@10 = 1.


def embeddings_with_similarities(sims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit queries/gallery whose cosine similarities are ``sims / 2``.

    Query i is the axis e_i; gallery j holds ``sims[:, j] / 2`` on the query axes and the rest of
    its unit norm on an axis of its own. Halving keeps every ranking and makes the norms fit.
    """
    nq, ng = sims.shape
    q = np.eye(nq, nq + ng, dtype=np.float32)
    g = np.zeros((ng, nq + ng), dtype=np.float32)
    g[:, :nq] = sims.T / 2
    g[np.arange(ng), nq + np.arange(ng)] = np.sqrt(1 - (g[:, :nq] ** 2).sum(axis=1))
    return q, g


def table(vectors, pids, cams, status=None) -> pa.Table:
    cols = {
        "image_id": [f"img{i}" for i in range(len(pids))],
        "embedding": pa.array(
            [None if v is None else list(v) for v in vectors], pa.list_(pa.float32())
        ),
        "person_id": pa.array(pids, pa.int64()),
        "camera_id": pa.array(cams, pa.int64()),
    }
    if status is not None:
        cols["status"] = status
    return pa.table(cols)


def test_hand_computed_market1501_scores():
    q, g = embeddings_with_similarities(SIMS)
    np.testing.assert_allclose(q @ g.T, SIMS / 2, atol=1e-6)
    # an error row in the gallery is ignored (its embedding is null)
    gallery = table([*g, None], [*GALLERY_PID, 1], [*GALLERY_CAM, 2], ["ok"] * 7 + ["error"])
    result = evaluate(table(q, QUERY_PID, QUERY_CAM), gallery, k_max=10)
    assert result["num_query"] == 3 and result["num_valid_query"] == 2
    assert result["mAP"] == pytest.approx(7 / 12)
    assert result["cmc@1"] == pytest.approx(0.5)
    assert result["cmc@5"] == pytest.approx(1.0) and result["cmc@10"] == pytest.approx(1.0)
    assert result["cmc"][:3] == pytest.approx([0.5, 0.5, 1.0])  # q0 is found at rank 3

    # one query per chunk gives the same numbers as one chunk
    chunked = evaluate(table(q, QUERY_PID, QUERY_CAM), gallery, chunk_elements=1)
    assert chunked == result


def test_query_with_only_same_camera_matches_is_skipped():
    # the only gallery image of person 5 was taken by the query's own camera
    q, g = embeddings_with_similarities(np.array([[0.9, 0.5, 0.2]]))
    gallery = table(g, [5, 6, 0], [1, 2, 2])
    result = evaluate(table(q, [5], [1]), gallery)
    assert (result["num_query"], result["num_valid_query"]) == (1, 0)
    assert math.isnan(result["mAP"]) and math.isnan(result["cmc@1"])

    # the same image seen by another camera counts, ranked behind a wrong identity
    gallery = table(g, [5, 6, 0], [3, 2, 2])
    result = evaluate(table(q, [5], [1]), gallery)
    assert result["num_valid_query"] == 1 and result["mAP"] == pytest.approx(1.0)
    gallery = table(g, [6, 5, 0], [3, 2, 2])
    assert evaluate(table(q, [5], [1]), gallery)["mAP"] == pytest.approx(0.5)


def test_distractor_and_junk_queries_are_not_evaluated():
    q, g = embeddings_with_similarities(np.array([[0.9, 0.5], [0.9, 0.5]]))
    result = evaluate(table(q, [0, -1], [1, 1]), table(g, [0, -1], [2, 2]))
    assert (result["num_query"], result["num_valid_query"]) == (2, 0)
