"""COCO box AP of one image, the ``map`` terms of ``vtriune_detection``.

V-Triune scores these with a copy of pycocotools whose only change is a single area range (all
boxes, areas 0 to 1e10). What that evaluation does for one image, written out here:

* categories are the ground-truth labels; predicted boxes of other labels are dropped; every
  prediction has confidence 1, and a stable sort keeps them in the order written (100 at most);
* per category and IoU threshold (0.5, 0.55, ..., 0.95), each prediction in turn takes the
  still-free ground-truth box of highest IoU at or above the threshold (a ground truth outside
  the area range is only taken when nothing else is, and then ignored, as is an unmatched
  prediction outside the range);
* precision is made monotone from the right and read at the recall points 0, 0.01, ..., 1;
  ``map`` is the mean over thresholds, recall points and categories that have a ground truth
  inside the range; ``map50`` and ``map75`` the same at one threshold; -1 when nothing counts.

IoU is computed as pycocotools does (boxes as x, y, w, h in doubles), not as ``vtriune_detection``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import numpy as np

_AREA_MAX = 1e5 ** 2
_MAX_DETS = 100
_IOU_THRS = np.linspace(.5, 0.95, int(np.round((0.95 - .5) / .05)) + 1, endpoint=True)
_REC_THRS = np.linspace(.0, 1.00, int(np.round((1.00 - .0) / .01)) + 1, endpoint=True)


def _xywh(b: Sequence[Any]) -> List[Any]:
    return [b[0], b[1], b[2] - b[0], b[3] - b[1]]


def _iou_xywh(d: Sequence[float], g: Sequence[float]) -> float:
    w = min(d[2] + d[0], g[2] + g[0]) - max(d[0], g[0])
    if w <= 0:
        return 0.0
    h = min(d[3] + d[1], g[3] + g[1]) - max(d[1], g[1])
    if h <= 0:
        return 0.0
    i = w * h
    return i / (d[2] * d[3] + g[2] * g[3] - i)


def _outside(area: float) -> bool:
    return area < 0 or area > _AREA_MAX


def _match(ious: np.ndarray, g_ignore: List[int]) -> tuple:
    """``(dt_matched, dt_ignored)``, each ``[T, D]`` bool, for one category."""
    t_n, (d_n, g_n) = len(_IOU_THRS), ious.shape
    g_taken = np.zeros((t_n, g_n), dtype=bool)
    dtm = np.zeros((t_n, d_n), dtype=bool)
    dt_ig = np.zeros((t_n, d_n), dtype=bool)
    for t, thr in enumerate(_IOU_THRS):
        for d in range(d_n):
            best, m = min(thr, 1 - 1e-10), -1
            for g in range(g_n):
                if g_taken[t, g]:
                    continue
                if m > -1 and g_ignore[m] == 0 and g_ignore[g] == 1:
                    break
                if ious[d, g] < best:
                    continue
                best, m = ious[d, g], g
            if m > -1:
                dt_ig[t, d], dtm[t, d], g_taken[t, m] = bool(g_ignore[m]), True, True
    return dtm, dt_ig


def _precision(gt: List[list], dt: List[list]) -> np.ndarray:
    """``[T, R]`` interpolated precision of one category, or None when no ground truth counts."""
    g_area = [b[2] * b[3] for b in gt]
    order = sorted(range(len(gt)), key=lambda j: int(_outside(g_area[j])))  # stable, as mergesort
    gt = [gt[j] for j in order]
    g_ignore = [int(_outside(g_area[j])) for j in order]
    npig = g_ignore.count(0)
    if npig == 0:
        return None
    dt = dt[:_MAX_DETS]
    ious = np.array([[_iou_xywh(d, g) for g in gt] for d in dt], dtype=np.float64).reshape(len(dt), len(gt))
    dtm, dt_ig = _match(ious, g_ignore)
    d_out = np.array([_outside(d[2] * d[3]) for d in dt], dtype=bool)
    dt_ig = dt_ig | (~dtm & d_out[None, :])
    tps = np.cumsum(dtm & ~dt_ig, axis=1).astype(float)
    fps = np.cumsum(~dtm & ~dt_ig, axis=1).astype(float)
    out = np.zeros((len(_IOU_THRS), len(_REC_THRS)))
    for t in range(len(_IOU_THRS)):
        tp, fp = tps[t], fps[t]
        rc = tp / npig
        pr = (tp / (fp + tp + np.spacing(1))).tolist()
        for i in range(len(pr) - 1, 0, -1):
            if pr[i] > pr[i - 1]:
                pr[i - 1] = pr[i]
        for r, k in enumerate(np.searchsorted(rc, _REC_THRS, side="left")):
            if k >= len(pr):
                break
            out[t, r] = pr[k]
    return out


def _mean(prec: np.ndarray) -> float:
    s = prec[prec > -1]
    return float(np.mean(s)) if s.size else -1.0


def coco_map(pred: List[Dict[str, Any]], gt: List[Dict[str, Any]]) -> Dict[str, float]:
    """``{"map", "map50", "map75"}`` of the predictions against the ground truth of one image."""
    cats: Dict[str, int] = {}
    for g in gt:
        cats.setdefault(g["label"], len(cats))
    dets = [p for p in pred if p["label"] in cats]
    if not dets:
        return {"map": 0.0, "map50": 0.0, "map75": 0.0}
    prec = -np.ones((len(_IOU_THRS), len(_REC_THRS), len(cats)))
    for label, k in cats.items():
        p = _precision([[float(v) for v in _xywh(g["bbox_2d"])] for g in gt if g["label"] == label],
                       [[float(v) for v in _xywh(d["bbox_2d"])] for d in dets if d["label"] == label])
        if p is not None:
            prec[:, :, k] = p
    at = {key: np.where(thr == _IOU_THRS)[0] for key, thr in (("map50", .5), ("map75", .75))}
    return {"map": _mean(prec), "map50": _mean(prec[at["map50"]]), "map75": _mean(prec[at["map75"]])}
