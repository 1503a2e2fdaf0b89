"""Ground-truth metrics on small hand-made cases whose answers are known, and salient agreement
with pysodmetrics' own dataset-level evaluation."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from vbatch.operators.quality import (
    boundary_f,
    decode_gt,
    iou,
    mask_metrics,
    matting_metrics,
    salient_metrics,
    score_frames,
    score_row,
)
from vbatch.operators.storage import Storage


def _square(shape: tuple[int, int], y: int, x: int, size: int) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    m[y : y + size, x : x + size] = 255
    return m


def test_salient_perfect_prediction() -> None:
    gt = _square((40, 40), 10, 10, 20)
    got = salient_metrics(gt.copy(), gt)
    assert got["gt_mae"] == 0.0
    assert got["gt_max_fmeasure"] == pytest.approx(1.0)
    assert got["gt_smeasure"] == pytest.approx(1.0)


def test_salient_constant_prediction_mae_is_background_share() -> None:
    # a constant map is not min-max stretched: 1.0 everywhere, wrong on every background pixel
    gt = np.zeros((20, 20), np.uint8)
    gt[:, :10] = 255
    assert salient_metrics(np.full((20, 20), 255, np.uint8), gt)["gt_mae"] == pytest.approx(0.5)


def test_salient_max_f_by_hand() -> None:
    # gt: 100 px; prediction: 200 px covering it → P = 0.5, R = 1, F(β²=0.3) = 0.65 / 1.15
    gt = _square((20, 20), 0, 0, 10)
    pred = np.zeros((20, 20), np.uint8)
    pred[:10, :] = 255
    assert salient_metrics(pred, gt)["gt_max_fmeasure"] == pytest.approx(0.65 / 1.15)


def test_salient_matches_pysodmetrics_over_a_dataset() -> None:
    import py_sod_metrics as sod

    rng = np.random.default_rng(0)
    pairs = []
    for i in range(6):
        gt = _square((48, 64), 5 + i, 8 + 2 * i, 20 + i)
        pred = cv2.GaussianBlur(gt, (9, 9), 3).astype(np.float64) + rng.normal(0, 30, gt.shape)
        pairs.append((np.clip(pred, 0, 255).astype(np.uint8), gt))
    mae, sm, em = sod.MAE(), sod.Smeasure(), sod.Emeasure()
    for pred, gt in pairs:
        for m in (mae, sm, em):
            m.step(pred=pred, gt=gt)
    ours = [salient_metrics(p, g) for p, g in pairs]
    # the dataset figures are means of per-image ones (E: of the per-image threshold curves)
    assert np.mean([o["gt_mae"] for o in ours]) == pytest.approx(mae.get_results()["mae"])
    assert np.mean([o["gt_smeasure"] for o in ours]) == pytest.approx(sm.get_results()["sm"])
    assert np.mean([o["gt_mean_emeasure"] for o in ours]) == pytest.approx(
        float(np.mean(em.get_results()["em"]["curve"]))
    )
    assert all(0 < o["gt_max_fmeasure"] < 1 for o in ours)


def test_salient_prediction_at_another_size_is_resized() -> None:
    gt = _square((40, 40), 10, 10, 20)
    small = cv2.resize(gt, (20, 20), interpolation=cv2.INTER_NEAREST)
    assert salient_metrics(small, gt)["gt_mae"] < 0.05  # bilinear edges only


def test_iou_by_hand() -> None:
    a = _square((10, 10), 0, 0, 4) > 0  # 16 px
    b = _square((10, 10), 2, 2, 4) > 0  # 16 px, 4 shared
    assert iou(a, b) == pytest.approx(4 / 28)
    empty = np.zeros((10, 10), bool)
    assert iou(empty, empty) == 1.0
    assert iou(a, empty) == 0.0


def test_boundary_f_by_hand() -> None:
    gt = _square((100, 100), 30, 30, 40) > 0
    assert boundary_f(gt, gt) == 1.0
    # tolerance: ceil(0.008 · 141.4) = 2 px; a 1-px shift matches everywhere, a 20-px one nowhere
    assert boundary_f(np.roll(gt, 1, axis=1), gt) == 1.0
    far = _square((100, 100), 0, 0, 10) > 0
    assert boundary_f(far, gt) == 0.0
    empty = np.zeros_like(gt)
    assert boundary_f(empty, empty) == 1.0
    assert boundary_f(empty, gt) == 0.0
    # a shift of 5 px: the two vertical edges (2 × 40 px) miss, the horizontal ones (2 × 40)
    # still match except their 3 end pixels each side past the tolerance → F between 0 and 1
    assert 0.3 < boundary_f(np.roll(gt, 5, axis=1), gt) < 0.7


def test_mask_metrics_thresholds_and_resizes() -> None:
    gt = _square((40, 40), 0, 0, 20)
    pred = cv2.resize(gt, (20, 20), interpolation=cv2.INTER_NEAREST)
    got = mask_metrics(pred, gt)
    assert got == {"gt_iou": 1.0, "gt_boundary_f": 1.0}


def test_matting_sad_mse_by_hand() -> None:
    alpha = np.full((100, 100), 255, np.uint8)
    gt = np.zeros((100, 100), np.uint8)
    assert matting_metrics(alpha, gt) == {"gt_sad": 10.0, "gt_mse": 1.0}
    gt[:, :50] = 255  # half right
    got = matting_metrics(alpha, gt)
    assert got["gt_sad"] == pytest.approx(5.0)
    assert got["gt_mse"] == pytest.approx(0.5)


def test_decode_gt_kinds() -> None:
    grey = _square((8, 8), 0, 0, 4)
    rgb = cv2.imencode(".png", np.dstack([grey] * 3))[1].tobytes()
    deep = cv2.imencode(".png", grey.astype(np.uint16) * 257)[1].tobytes()
    assert np.array_equal(decode_gt(rgb), grey)
    assert np.array_equal(decode_gt(deep), grey)
    with pytest.raises(ValueError, match="empty"):
        decode_gt(b"")
    with pytest.raises(ValueError, match="not a decodable image"):
        decode_gt(b"hello")


def test_score_row_never_raises(tmp_path) -> None:
    storage = Storage()
    gt = _square((20, 20), 0, 0, 10)
    (tmp_path / "gt.png").write_bytes(cv2.imencode(".png", gt)[1].tobytes())
    (tmp_path / "bad.png").write_bytes(b"not a png")
    base = str(tmp_path)
    metrics, error = score_row("shop-seg", gt, "gt.png", base, storage)
    assert error is None and metrics["gt_iou"] == 1.0
    assert score_row("shop-seg", gt, None, base, storage) == ({}, None)
    assert score_row("shop-seg", gt, "  ", base, storage) == ({}, None)
    metrics, error = score_row("shop-seg", gt, "missing.png", base, storage)
    assert metrics == {} and "ground truth: object not found" in error
    metrics, error = score_row("salient", gt, "bad.png", base, storage)
    assert metrics == {} and "not a decodable image" in error
    # matting scores the cut-out's alpha
    rgba = np.dstack([np.zeros((20, 20, 3), np.uint8), gt])
    metrics, error = score_row("matting", rgba, "gt.png", base, storage)
    assert error is None and metrics == {"gt_sad": 0.0, "gt_mse": 0.0}


def test_score_frames_by_hand(tmp_path) -> None:
    """rvos: J and F per annotated frame of ``<gt_dir>/<query>/<frame>.png``; unannotated frames are
    left out, an unreadable file is that frame's error, a folder without masks every frame's."""
    gt = _square((10, 10), 0, 0, 4)
    (tmp_path / "gt" / "1").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "gt" / "1" / "5.png"), gt)
    cv2.imwrite(str(tmp_path / "gt" / "1" / "6.png"), np.zeros_like(gt))
    (tmp_path / "gt" / "1" / "7.png").write_bytes(b"")
    masks = {f: _square((10, 10), 2, 2, 4) for f in (4, 5, 6, 7)}
    got = score_frames("gt", str(tmp_path), 1, masks, Storage())
    assert sorted(got) == [5, 6, 7]  # frame 4 has no ground truth
    assert got[5][0]["gt_j"] == pytest.approx(4 / 28) and got[5][1] is None
    assert got[6][0] == {"gt_j": 0.0, "gt_f": 0.0}  # a mask where the truth is empty
    assert got[7][0] == {} and "gt/1/7.png" in got[7][1] and "empty file" in got[7][1]
    wrong = score_frames("gt", str(tmp_path), 0, masks, Storage())  # no folder for query 0
    assert sorted(wrong) == [4, 5, 6, 7]
    assert all(m == {} and "no ground-truth masks" in e for m, e in wrong.values())
    assert score_frames(None, str(tmp_path), 1, masks, Storage()) == {}
