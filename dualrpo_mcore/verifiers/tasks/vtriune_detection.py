"""``vtriune_detection``: V-Triune's ``detection`` verifier (detection and grounding rows).

answer: the row's ``reward_model.ground_truth`` as published, ``<answer>[{'bbox_2d': [x1, y1, x2,
y2], 'label': 'dog'}, ...]</answer>``; it is parsed at scoring time with the same sanitation as the
response, so a row whose boxes are degenerate or malformed still loads (and scores as theirs).
params:
  accuracy_ratio, format_ratio   the weighting of ``vtriune_common`` (defaults 1.0 and 0.1).
  det_reward_ratio   weights of five accuracy terms: ``iou_max_iou_first``,
                     ``iou_max_label_first``, ``map``, ``map50``, ``map75``; plus
                     ``iou_completeness``, the share of completeness inside each IoU term. A
                     missing key, a null or a value outside [0, 1] counts as 0; all five zero
                     gives accuracy 0.
  det_verifier_normalized   when true, predicted coordinates are pixels of the model's input
                     image and are mapped to the ground truth's 0..1000 grid (truncated to
                     integers) using ``image_hw``.
  image_hw           ``[height, width]`` of the image as the model saw it (grid * 14); without it
                     no mapping happens (as theirs, which only logs a warning).
  iou_threshold      ``dynamic`` (default; ``detection``'s V-Triune schedule, 0.85 without a
                     progress), ``average`` (the mean over the eleven thresholds 0.5, 0.55, ...,
                     0.95, 0.99) or one of those eleven numbers.

Scoring, as their server does it (format, box sanitation in ``boxes_from``, the IoU terms, the
``max_iou_first`` slip, the mAP terms of ``vtriune_map``): docs/vtriune.md, "The reward profile".
Left out there: the sanitation's four numbers may be booleans, as in theirs, and
``max_label_first`` matches each ground truth, in order, to the unmatched same-label prediction of
highest IoU at or above the threshold.
"""
from __future__ import annotations

import json
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

from dualrpo_mcore.verifiers.base import Context, param_bool, param_pair, register_verifier
from dualrpo_mcore.verifiers.tasks.detection import VTRIUNE_SCHEDULE, threshold_at
from dualrpo_mcore.verifiers.vtriune_common import (
    RATIO_PARAMS, WholeRewardZero, answer_block, combine, ratios,
)
# at import, not on first use: numpy's import sets environment variables, which a pool worker's
# sandbox refuses once it has warmed up
from dualrpo_mcore.verifiers.vtriune_map import coco_map

IOU_THRESHOLDS = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.99)
SIZE_PENALTY = 0.6
RATIO_KEYS = ("iou_max_label_first", "iou_max_iou_first", "iou_completeness", "map", "map50", "map75")
TERM_KEYS = ("iou_max_iou_first", "iou_max_label_first", "map", "map50", "map75")
NORMALIZE_TO = 1000.0

Box = Dict[str, Any]  # {"bbox_2d": [x1, y1, x2, y2], "label": str}


# ---------------------------------------------------------------------------------------------
# box lists

def _is_coord(v: Any) -> bool:
    return isinstance(v, (int, float))  # bool is an int: [true, 0, 1, 1] is a box to them


def _keep(item: Any) -> bool:
    if not isinstance(item, dict) or "bbox_2d" not in item or "label" not in item:
        return False
    b = item["bbox_2d"]
    return (isinstance(b, list) and len(b) == 4 and all(_is_coord(v) for v in b)
            and b[0] <= b[2] and b[1] <= b[3] and isinstance(item["label"], str))


def boxes_from(text: str) -> Optional[List[Box]]:
    """The sanitised box list written in ``text``, or None (nothing parseable, nothing kept)."""
    if not text or not text.strip():
        return None
    s = text.replace("[[", "[").replace("]]", "]")
    if not s.endswith("]"):
        s = s.rsplit("},", 1)[0] + "}]"
    s = s.replace("'", '"').replace("\\", "")
    try:
        items = json.loads(s)
    except (ValueError, RecursionError):
        return None
    if not isinstance(items, list):
        return None
    kept, seen = [], set()
    for item in items:
        if _keep(item):
            pos = tuple(item["bbox_2d"])
            if pos not in seen:
                seen.add(pos)
                kept.append(item)
    return kept or None


def _to_grid(boxes: List[Box], height: float, width: float) -> List[Box]:
    out = []
    for b in boxes:
        x1, y1, x2, y2 = b["bbox_2d"]
        try:
            # their exact expression (x / w * 1000, then int), so truncation lands where theirs does
            grid = [int(x1 / width * NORMALIZE_TO), int(y1 / height * NORMALIZE_TO),
                    int(x2 / width * NORMALIZE_TO), int(y2 / height * NORMALIZE_TO)]
        except OverflowError:
            raise WholeRewardZero("coordinate too large to map") from None
        except (ValueError, TypeError):
            grid = b["bbox_2d"]  # theirs logs and keeps the box unmapped
        out.append(dict(b, bbox_2d=grid))
    return out


# ---------------------------------------------------------------------------------------------
# IoU and the two greedy matchings

def iou(a: Sequence[Any], b: Sequence[Any]) -> float:
    """IoU of two xyxy boxes, their arithmetic (ints stay exact until the final division)."""
    ix1, iy1 = max(a[0], b[0]), max(a[1], b[1])
    ix2, iy2 = min(a[2], b[2]), min(a[3], b[3])
    if ix2 <= ix1 or iy2 <= iy1:
        return 0.0
    inter = (ix2 - ix1) * (iy2 - iy1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    try:
        return float(inter) / union
    except (OverflowError, ZeroDivisionError):
        raise WholeRewardZero("IoU not computable") from None


def _same_label(p: Box, g: Box) -> bool:
    return p["label"].lower() == g["label"].lower()


def match_max_iou_first(pred: List[Box], gt: List[Box], ious: List[List[float]], thr: float) -> List[float]:
    left_p, left_g = list(range(len(pred))), list(range(len(gt)))
    scores = []
    while left_p and left_g:
        best = -1.0
        for i in left_p:
            for j in left_g:
                if ious[i][j] > best:
                    best = ious[i][j]
        if best < thr:
            break
        i, j = left_p[-1], left_g[-1]
        scores.append(best if _same_label(pred[i], gt[j]) else 0.0)
        left_p.remove(i)
        left_g.remove(j)
    return scores


def match_max_label_first(pred: List[Box], gt: List[Box], ious: List[List[float]], thr: float) -> List[float]:
    used, scores = set(), []
    for j, g in enumerate(gt):
        cands = [i for i in range(len(pred)) if i not in used and _same_label(pred[i], g)]
        if not cands:
            continue
        vals = [ious[i][j] for i in cands]
        if any(v != v for v in vals):  # numpy's max and argmax both land on the NaN
            continue
        k = max(range(len(vals)), key=lambda n: (vals[n], -n))
        if vals[k] >= thr:
            scores.append(vals[k])
            used.add(cands[k])
    return scores


_STRATEGIES = {"iou_max_iou_first": match_max_iou_first, "iou_max_label_first": match_max_label_first}


def weighted_iou(scores: List[float], n_pred: int, n_gt: int, completeness_w: float) -> float:
    mean_iou = sum(scores) / n_gt if scores else 0.0
    miss = (n_gt - len(scores)) / n_gt
    false_alarm = 0.0 if n_pred == 0 else (n_pred - len(scores)) / n_pred
    completeness = 1.0 - (miss + false_alarm) / 2.0
    return mean_iou * (1.0 - completeness_w) + completeness * completeness_w


# ---------------------------------------------------------------------------------------------
# params

def reward_weights(params: Mapping[str, Any]) -> Dict[str, float]:
    raw = params.get("det_reward_ratio") or {}
    out = {}
    for key in RATIO_KEYS:
        v = raw.get(key)
        out[key] = float(v) if isinstance(v, (int, float)) and 0 <= v <= 1 else 0.0
    return out


def threshold(params: Mapping[str, Any], progress: Optional[float]):
    """The IoU threshold in force, or ``"average"``."""
    mode = params.get("iou_threshold", "dynamic")
    if mode == "dynamic":
        return threshold_at(progress, VTRIUNE_SCHEDULE)
    return mode if mode == "average" else float(mode)


def _check(answer: Any, params: Mapping[str, Any]) -> None:
    if not isinstance(answer, str):
        raise ValueError(f"answer must be the ground-truth string, got {type(answer).__name__}")
    ratios(params)
    raw = params.get("det_reward_ratio")
    if raw is not None and not isinstance(raw, Mapping):
        raise ValueError(f"params.det_reward_ratio must be a dict, got {type(raw).__name__}")
    for key in RATIO_KEYS:
        v = (raw or {}).get(key)
        # a non-number makes their verifier raise (reward 0 for every response): refuse the row
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v)):
            raise ValueError(f"params.det_reward_ratio.{key} must be a finite number, got {v!r}")
    if params.get("det_verifier_normalized") is not None:
        param_bool(params, "det_verifier_normalized", False)
    param_pair(params, "image_hw", "[height, width]")
    mode = params.get("iou_threshold", "dynamic")
    if mode not in ("dynamic", "average") and mode not in IOU_THRESHOLDS:
        raise ValueError(f"params.iou_threshold must be 'dynamic', 'average' or one of {list(IOU_THRESHOLDS)}")


# ---------------------------------------------------------------------------------------------
# scoring

def format_score(response: str) -> float:
    if "\n<answer>\n" not in response or response.count("\n</answer>") != 1:
        return 0.0
    return 1.0 if boxes_from(answer_block(response).lower()) else 0.0


def _iou_terms(pred, gt, w, thr) -> Dict[str, float]:
    ious = [[iou(p["bbox_2d"], g["bbox_2d"]) for g in gt] for p in pred]
    c = w["iou_completeness"]
    thrs = IOU_THRESHOLDS if thr == "average" else (thr,)  # "average": the mean over the eleven
    return {key: sum(weighted_iou(fn(pred, gt, ious, t), len(pred), len(gt), c) for t in thrs) / len(thrs)
            for key, fn in _STRATEGIES.items()}


def accuracy_score(response: str, answer: str, params: Mapping[str, Any], progress: Optional[float]) -> float:
    pred = boxes_from(answer_block(response).lower())
    gt = boxes_from(answer_block(answer).lower())
    if gt is None or pred is None:
        return 0.0
    hw = params.get("image_hw")
    if params.get("det_verifier_normalized") and hw:
        pred = _to_grid(pred, hw[0], hw[1])
    w = reward_weights(params)
    terms = _iou_terms(pred, gt, w, threshold(params, progress))
    if any(w[k] for k in ("map", "map50", "map75")):
        terms.update(coco_map(pred, gt))
    else:
        terms.update(map=0.0, map50=0.0, map75=0.0)
    total = sum(w[k] for k in TERM_KEYS)
    if total <= 0:
        return 0.0
    penalty = SIZE_PENALTY ** abs(len(pred) - len(gt))
    return sum(terms[k] * penalty * w[k] for k in TERM_KEYS) / total


@register_verifier("vtriune_detection", check=_check, params=RATIO_PARAMS + (
    "det_reward_ratio", "det_verifier_normalized", "image_hw", "iou_threshold"))
def score_vtriune_detection(answer: Any, response: str, params: Mapping[str, Any], ctx: Context) -> float:
    try:
        acc = accuracy_score(response, answer, params, ctx.progress)
    except WholeRewardZero:
        return 0.0
    return combine(acc, format_score(response), params)
