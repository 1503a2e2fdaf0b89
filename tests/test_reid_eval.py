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


def _str_table(vectors, pids, cams, **extra) -> pa.Table:
    cols = {
        "image_id": [f"img{i}" for i in range(len(pids))],
        "embedding": pa.array([list(v) for v in vectors], pa.list_(pa.float32())),
        "person_id": pa.array(pids, pa.string()),
        "camera_id": pa.array(cams),
    }
    return pa.table({**cols, **extra})


def test_string_person_ids_follow_the_junk_and_distractor_rules():
    # the hand-computed case above with ids as Market-1501 file names give them: "0001", "-1"
    q, g = embeddings_with_similarities(SIMS)
    gallery = _str_table(g, [f"{p:04d}" if p >= 0 else str(p) for p in GALLERY_PID], GALLERY_CAM)
    query = _str_table(q, ["0001", "0002", "0003"], QUERY_CAM)
    result = evaluate(query, gallery)
    assert result["num_valid_query"] == 2
    assert result["mAP"] == pytest.approx(7 / 12)  # as strings, "-1"/"0000" were ordinary ids
    assert result["cmc"][:3] == pytest.approx([0.5, 0.5, 1.0])
    # string camera ids of integers equal integer ones; "0000" and "-1" queries are not evaluated
    query = _str_table(q[:2], ["0000", " -1"], ["1", "1"])
    assert evaluate(query, gallery)["num_valid_query"] == 0


def test_person_ids_that_are_not_integers_are_refused():
    q, g = embeddings_with_similarities(SIMS)
    gallery = _str_table(g, ["1", "1", "2", "0", "-1", "x2", "4"], GALLERY_CAM)
    with pytest.raises(
        ValueError, match=r"gallery table: row 5 \(image_id=img5\) has person_id 'x2'"
    ):
        evaluate(_str_table(q, ["1", "2", "3"], QUERY_CAM), gallery)
    floats = table(g, GALLERY_PID, GALLERY_CAM).set_column(
        2, "person_id", pa.array([float(p) for p in GALLERY_PID])
    )
    with pytest.raises(ValueError, match="person_id has type double"):
        evaluate(table(q, QUERY_PID, QUERY_CAM), floats)


def test_rows_of_shifted_lengths_are_refused():
    # rows 1 and 2 of 9 and 11 values add up to 2 x 10: the total-size check passed them
    q, g = embeddings_with_similarities(SIMS)
    rows = [list(map(float, v)) for v in g]
    rows[2] = [rows[1][-1], *rows[2]]
    rows[1] = rows[1][:-1]
    gallery = table(g, GALLERY_PID, GALLERY_CAM).set_column(
        1, "embedding", pa.array(rows, pa.list_(pa.float32()))
    )
    with pytest.raises(
        ValueError,
        match=r"gallery table: row 1 \(image_id=img1\) has status 'ok' but embedding has 9 values, "
        r"expected 10 \(2 such rows",
    ):
        evaluate(table(q, QUERY_PID, QUERY_CAM), gallery)


@pytest.mark.parametrize(("bad", "message"), [(np.nan, "non-finite"), (0.0, "zero-norm")])
def test_nan_or_zero_vectors_are_refused_never_scored(bad, message):
    q, g = embeddings_with_similarities(SIMS)
    q = q.copy()
    q[1] = bad  # a query that would otherwise count as evaluated
    with pytest.raises(
        ValueError, match=rf"query table: row 1 \(image_id=img1\) has status 'ok' but {message}"
    ):
        evaluate(table(q, QUERY_PID, QUERY_CAM), table(g, GALLERY_PID, GALLERY_CAM))
    q, g = embeddings_with_similarities(SIMS)
    g = g.copy()
    g[6] = bad
    with pytest.raises(ValueError, match=rf"gallery table: row 6 .*{message}"):
        evaluate(table(q, QUERY_PID, QUERY_CAM), table(g, GALLERY_PID, GALLERY_CAM))
    # an error row (status not ok) may hold anything: it is not read
    g_rows = table(g, GALLERY_PID, GALLERY_CAM, ["ok"] * 6 + ["error"])
    q, _ = embeddings_with_similarities(SIMS)
    # without g6: q0 still finds g0 at rank 3 (1/3), q1 finds g2 and g5 at ranks 1 and 2 (1)
    assert evaluate(table(q, QUERY_PID, QUERY_CAM), g_rows)["mAP"] == pytest.approx(2 / 3)


def test_model_versions_must_match():
    q, g = embeddings_with_similarities(SIMS)
    query = table(q, QUERY_PID, QUERY_CAM).append_column("model_version", pa.array(["v1"] * 3))
    gallery = table(g, GALLERY_PID, GALLERY_CAM).append_column(
        "model_version", pa.array(["v2"] * 7)
    )
    with pytest.raises(ValueError, match=r"model_version \['v1'\] and the gallery from \['v2'\]"):
        evaluate(query, gallery)
    assert evaluate(query, gallery, allow_model_mismatch=True)["mAP"] == pytest.approx(7 / 12)
    same = gallery.set_column(4, "model_version", pa.array(["v1"] * 7))
    assert evaluate(query, same)["mAP"] == pytest.approx(7 / 12)
