"""Per-image quality metrics against a ground-truth mask (the manifest's ``gt_mask_uri``).

* salient: MAE, max F-measure (β² = 0.3), S-measure, mean E-measure, computed by
  `pysodmetrics <https://github.com/lartpang/PySODMetrics>`_, the implementation salient-object
  detection papers report with (prediction min-max normalised, ground truth > 128);
* shop-seg: IoU (Jaccard, region ``J``) and boundary F (``F`` of DAVIS, Perazzi et al., CVPR 2016,
  ``db_eval_boundary``: boundaries matched within 0.8 % of the image diagonal);
* rvos: per frame, region J (IoU) and boundary F against the manifest's ``gt_mask_dir`` (DAVIS /
  Ref-YouTube-VOS); the report averages them per video and query and gives J&F = (J + F) / 2;
* matting: SAD (sum of absolute alpha differences, alpha in [0, 1], reported in thousands as the
  alphamatting.com benchmark does) and MSE (alpha in [0, 1]). Gradient and connectivity errors are
  not computed: no maintained library on PyPI provides them.

A prediction whose size differs from its ground truth (``--mask-size model``) is resized to the
ground truth's size first (bilinear for soft maps, nearest for binary masks), as SOD evaluation
toolkits do. A ground truth that cannot be read or decoded never fails the row: the metrics stay
null and ``gt_error`` says why (:func:`score_row`).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable

import cv2
import numpy as np

from vbatch.operators.redact import redact_uri
from vbatch.operators.storage import Storage, describe_read_error, resolve

logger = logging.getLogger(__name__)

#: the manifest column naming each image's ground-truth mask (8-bit grey; > 128 is foreground)
GT_COLUMN = "gt_mask_uri"
#: the video manifest column naming each video's ground-truth folder:
#: ``<gt_mask_dir>/<query_index>/<frame_index>.png`` (the layout of the job's own ``frames/``); a
#: frame without a file there is not scored (Ref-YouTube-VOS annotates every fifth frame)
GT_DIR_COLUMN = "gt_mask_dir"
#: why a row's metrics are null although it has a ground truth (unreadable, wrong size …)
GT_ERROR = "gt_error"

#: boundary F's matching tolerance as a fraction of the image diagonal (DAVIS's default)
BOUNDARY_TOLERANCE = 0.008


# -- reading --------------------------------------------------------------------------------------
def decode_gt(data: bytes) -> np.ndarray:
    """Ground-truth bytes (PNG, JPEG, BMP …; grey, RGB, RGBA or 16-bit) → (H, W) uint8.

    Colour masks are converted to grey; 16-bit ones are scaled to 8 bits.

    Raises:
        ValueError: empty or undecodable bytes.
    """
    if not data:
        raise ValueError("empty file (0 bytes)")
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ValueError("not a decodable image")
    if arr.dtype == np.uint16:
        arr = (arr // 257).astype(np.uint8)
    if arr.dtype != np.uint8:
        raise ValueError(f"unsupported pixel type {arr.dtype}")
    if arr.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if arr.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        arr = cv2.cvtColor(arr, code)
    return arr


def _fit(pred: np.ndarray, shape: tuple[int, int], binary: bool) -> np.ndarray:
    if pred.shape[:2] == shape:
        return pred
    interp = cv2.INTER_NEAREST if binary else cv2.INTER_LINEAR
    return cv2.resize(pred, (shape[1], shape[0]), interpolation=interp)


# -- salient (pysodmetrics) -----------------------------------------------------------------------
def salient_metrics(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """MAE, max F-measure, S-measure and mean E-measure of one saliency map.

    Args:
        pred: (H, W) uint8 saliency map (resized to ``gt``'s size when it differs).
        gt: (H, W) uint8 ground truth; > 128 is foreground.

    Returns:
        ``{"gt_mae", "gt_max_fmeasure", "gt_smeasure", "gt_mean_emeasure"}``, each in [0, 1]
        (MAE lower is better, the others higher).
    """
    import py_sod_metrics as sod

    pred = _fit(pred, gt.shape, binary=False)
    mae, sm, em = sod.MAE(), sod.Smeasure(), sod.Emeasure()
    with warnings.catch_warnings():  # Fmeasure warns that FmeasureV2 will replace it
        warnings.simplefilter("ignore")
        fm = sod.Fmeasure()
    for metric in (mae, sm, em, fm):
        metric.step(pred=pred, gt=gt)
    return {
        "gt_mae": float(mae.get_results()["mae"]),
        "gt_max_fmeasure": float(np.max(fm.get_results()["fm"]["curve"])),
        "gt_smeasure": float(sm.get_results()["sm"]),
        "gt_mean_emeasure": float(np.mean(em.get_results()["em"]["curve"])),
    }


# -- binary masks ---------------------------------------------------------------------------------
def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Intersection over union of two boolean masks; 1.0 when both are empty (DAVIS's J)."""
    union = np.count_nonzero(pred | gt)
    return 1.0 if union == 0 else float(np.count_nonzero(pred & gt) / union)


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """The boundary pixels of a boolean mask: foreground pixels with a 4-neighbour in the
    background (the image border does not count as background)."""
    m = mask.astype(np.uint8)
    eroded = cv2.erode(
        m,
        cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3)),
        borderType=cv2.BORDER_REPLICATE,
    )
    return (m & ~eroded.astype(bool)).astype(bool)


def boundary_f(pred: np.ndarray, gt: np.ndarray, tolerance: float = BOUNDARY_TOLERANCE) -> float:
    """Boundary F-measure (DAVIS's ``F``): boundary precision and recall, a boundary pixel
    counting as matched when the other mask's boundary lies within ``ceil(tolerance · diagonal)``
    pixels (a disk).

    Args:
        pred, gt: (H, W) boolean masks of the same shape.
        tolerance: fraction of the image diagonal.

    Returns:
        F in [0, 1]; 1.0 when neither mask has a boundary, 0.0 when only one has.
    """
    radius = max(1, math.ceil(tolerance * math.hypot(*gt.shape[:2])))
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    pb, gb = boundary_map(pred), boundary_map(gt)
    n_pred, n_gt = int(pb.sum()), int(gb.sum())
    if n_pred == 0 and n_gt == 0:
        return 1.0
    if n_pred == 0 or n_gt == 0:
        return 0.0
    pred_dil = cv2.dilate(pb.astype(np.uint8), disk).astype(bool)
    gt_dil = cv2.dilate(gb.astype(np.uint8), disk).astype(bool)
    precision = np.count_nonzero(pb & gt_dil) / n_pred
    recall = np.count_nonzero(gb & pred_dil) / n_gt
    return 0.0 if precision + recall == 0 else float(2 * precision * recall / (precision + recall))


def mask_metrics(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """IoU and boundary F of a 0/255 mask (shop-seg) against a ground truth.

    Args:
        pred, gt: (H, W) uint8; both thresholded at > 128.

    Returns:
        ``{"gt_iou", "gt_boundary_f"}``.
    """
    p = _fit(pred, gt.shape, binary=True) > 128
    g = gt > 128
    return {"gt_iou": iou(p, g), "gt_boundary_f": boundary_f(p, g)}


# -- matting --------------------------------------------------------------------------------------
def matting_metrics(alpha: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """SAD and MSE of an alpha matte.

    Args:
        alpha: (H, W) uint8 predicted alpha; gt: (H, W) uint8 ground-truth alpha.

    Returns:
        ``{"gt_sad"}``: Σ|α − α_gt| with α in [0, 1], divided by 1000 (the benchmark's unit);
        ``{"gt_mse"}``: mean (α − α_gt)² with α in [0, 1].
    """
    a = _fit(alpha, gt.shape, binary=False).astype(np.float64) / 255.0
    g = gt.astype(np.float64) / 255.0
    diff = a - g
    return {"gt_sad": float(np.abs(diff).sum() / 1000.0), "gt_mse": float(np.mean(diff**2))}


def region_boundary(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """Region J and boundary F of one video frame's 0/255 mask (rvos), as DAVIS scores them.

    Returns:
        ``{"gt_j", "gt_f"}``; both 1.0 when prediction and ground truth are both empty.
    """
    m = mask_metrics(pred, gt)
    return {"gt_j": m["gt_iou"], "gt_f": m["gt_boundary_f"]}


def gt_frames(gt_dir: str, query_index: int, storage: Storage) -> set[int]:
    """The frame indices that have a ground-truth mask for this query (one listing).

    Raises:
        FileNotFoundError: the query's folder has no ``<frame>.png`` at all (a wrong
            ``gt_mask_dir`` must not pass as "nothing annotated").
    """
    import posixpath

    folder = posixpath.join(gt_dir.rstrip("/"), str(query_index))
    try:
        names = [posixpath.basename(f) for f in storage.list_files(folder, ".png")]
    except FileNotFoundError:
        names = []
    frames = {int(n[: -len(".png")]) for n in names if n[: -len(".png")].isdigit()}
    if not frames:
        raise FileNotFoundError(f"no ground-truth masks <frame>.png under {folder}/")
    return frames


def score_frames(
    gt_dir: str | None,
    base_uri: str,
    query_index: int,
    masks: dict[int, np.ndarray],
    storage: Storage,
) -> dict[int, tuple[dict[str, float], str | None]]:
    """J and F of one query's frames against ``<gt_dir>/<query_index>/<frame>.png``.

    Args:
        gt_dir: the video's ``gt_mask_dir`` (relative: against ``base_uri``); ``None``/blank: none.
        masks: frame index → the frame's 0/255 mask.

    Returns:
        frame → (metrics, None) for a scored frame, ({}, message) for a frame whose ground truth
        cannot be used: every frame when the query has no ground-truth folder or no masks in it,
        else the frames whose file is unreadable. Frames without a ground truth are left out.
    """
    if gt_dir is None or not gt_dir.strip():
        return {}
    folder = resolve(gt_dir.strip(), base_uri)
    try:
        annotated = gt_frames(folder, query_index, storage)
    except FileNotFoundError as e:
        return dict.fromkeys(masks, ({}, redact_uri(f"ground truth: {e}")))
    except Exception as e:
        return dict.fromkeys(masks, ({}, f"ground truth: {describe_read_error(e, folder)}"))
    scores: dict[int, tuple[dict[str, float], str | None]] = {}
    for frame, mask in masks.items():
        if frame not in annotated:
            continue
        uri = f"{folder.rstrip('/')}/{query_index}/{frame}.png"
        try:
            scores[frame] = (region_boundary(mask, decode_gt(storage.read_bytes(uri))), None)
        except Exception as e:
            scores[frame] = ({}, redact_uri(f"ground truth {uri}: {type(e).__name__}: {e}"))
    return scores


#: the metric function of each per-image metric kind (``ModelEntry.metric_kind``; the columns it
#: fills: ``schemas.images.METRIC_FIELDS``)
METRICS: dict[str, Callable[[np.ndarray, np.ndarray], dict[str, float]]] = {
    "saliency": salient_metrics,
    "mask": mask_metrics,
    "matte": matting_metrics,
}


def metric_kind(task: str) -> str | None:
    """How ``task``'s products are scored per image (``None``: they are not)."""
    from vbatch.models.registry import model_entry

    kind = model_entry(task).metric_kind
    return kind if kind in METRICS else None


#: whether a higher value is better (the report's and --compare's arrows)
HIGHER_IS_BETTER = {
    "gt_mae": False,
    "gt_max_fmeasure": True,
    "gt_smeasure": True,
    "gt_mean_emeasure": True,
    "gt_iou": True,
    "gt_boundary_f": True,
    "gt_sad": False,
    "gt_mse": False,
    "gt_j": True,
    "gt_f": True,
}


def score_row(
    task: str, product: np.ndarray, gt_uri: str | None, base_uri: str, storage: Storage
) -> tuple[dict[str, float], str | None]:
    """The metrics of one row's product against its ground truth.

    Args:
        task: ``salient``, ``shop-seg`` or ``matting``.
        product: the mask (H, W) uint8, or for matting the RGBA cut-out (H, W, 4) or the alpha.
        gt_uri: the ground truth (relative URIs resolve against ``base_uri``); ``None`` or blank:
            no ground truth for this row.
        base_uri: the manifest's folder.
        storage: reaches the ground truth.

    Returns:
        (metrics, None) when scored; ({}, None) without a ground truth; ({}, message) when the
        ground truth could not be used (the row stays ``ok``; only its metrics are null).
    """
    if gt_uri is None or not gt_uri.strip():
        return {}, None
    uri = resolve(gt_uri.strip(), base_uri)
    try:
        data = storage.read_bytes(uri)
    except Exception as e:
        return {}, f"ground truth: {describe_read_error(e, uri)}"
    try:
        gt = decode_gt(data)
        pred = product[..., 3] if product.ndim == 3 else product
        kind = metric_kind(task)
        if kind is None:
            raise ValueError(f"{task} products have no per-image metrics")
        return METRICS[kind](pred, gt), None
    except Exception as e:
        return {}, redact_uri(f"ground truth {uri}: {type(e).__name__}: {e}")
