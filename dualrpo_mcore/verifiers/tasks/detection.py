"""``detection``: many boxes (optionally labelled), one-to-one IoU matching.

answer: a list of boxes ``[[x1, y1, x2, y2], ...]`` or of ``{"bbox_2d": [...], "label": "dog"}``
(``bbox``/``box`` keys are accepted too), in ``answer_coords``. An empty list is allowed: then
an empty prediction scores 1 and any predicted box 0.
params (plus the coordinate params of ``geometry_params``):
  metric          ``f1`` (default): F1 of precision/recall where a true positive is a matched
                  pair with IoU >= the threshold | ``mean_iou``: sum of the IoUs of matched pairs
                  at or above the threshold divided by ``max(#pred, #gt)`` (misses and extra
                  boxes both pull it down).
  iou_threshold   fixed threshold; overrides the schedule.
  schedule        ``[[progress_upto, threshold], ...]`` increasing in progress; the threshold of
                  the first stage whose ``progress_upto >= progress`` applies. Default is
                  V-Triune's "dynamic IoU" (One RL to See Them All, MiniMax 2025, as released in
                  their reward server): 0.85 up to 10 % of training, 0.95 up to 25 %, then 0.99.
                  Without a progress (evaluation) the first stage applies.
  use_labels      only boxes with equal labels (case-insensitive) may match; default True when
                  every gold box has a label.
  max_boxes       predictions beyond this many are not parsed but still count as false
                  positives through their number (default 50).
  fallback        ``full`` (default) | ``last_line`` | ``none``.
Matching maximises the number of pairs above the threshold, then their total IoU (Hungarian
algorithm on ``[IoU >= t] + IoU / (n + 1)``), so the score is the best achievable one-to-one
assignment, not a greedy one.
"""
from __future__ import annotations

from typing import Any, List, Mapping, Optional, Sequence, Tuple

from dualrpo_mcore.verifiers.base import (
    Context, Unparsable, param_bool, param_choice, param_int, param_number, register_verifier,
)
from dualrpo_mcore.verifiers.boxes import MAX_BOXES, box_and_label, iou, max_weight_matching, parse_boxes
from dualrpo_mcore.verifiers.extract import FALLBACKS, answer_span
from dualrpo_mcore.verifiers.geometry_params import GEOMETRY_PARAMS, check_geometry, to_abs

VTRIUNE_SCHEDULE = ((0.10, 0.85), (0.25, 0.95), (1.0, 0.99))
_DEFAULT_MAX_BOXES = 50
_SPAN_CHARS = 16384


def threshold_at(progress: Optional[float], schedule: Sequence[Sequence[float]] = VTRIUNE_SCHEDULE
                 ) -> float:
    if progress is None:
        return float(schedule[0][1])
    for upto, thr in schedule:
        if progress <= upto:
            return float(thr)
    return float(schedule[-1][1])


def _gold_items(answer: Any) -> List[Tuple[Any, Optional[str]]]:
    return [box_and_label(item) if isinstance(item, Mapping) else (item, None) for item in answer]


def _check(answer: Any, params: Mapping[str, Any]) -> None:
    check_geometry(params)
    param_choice(params, "metric", ("f1", "mean_iou"), "f1")
    param_number(params, "iou_threshold", lo=0.0, hi=1.0, allow_none=True)
    param_int(params, "max_boxes", _DEFAULT_MAX_BOXES, lo=1, hi=MAX_BOXES)
    param_choice(params, "fallback", FALLBACKS, "full")
    param_bool(params, "use_labels", True)
    sched = params.get("schedule")
    if sched is not None:
        ok = isinstance(sched, (list, tuple)) and len(sched) > 0 and all(
            isinstance(s, (list, tuple)) and len(s) == 2 and
            all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in s)
            for s in sched)
        if not ok or any(a[0] >= b[0] for a, b in zip(sched, sched[1:])):
            raise ValueError("params.schedule must be [[progress_upto, threshold], ...] in [0, 1] "
                             "with increasing progress_upto")
    if not isinstance(answer, (list, tuple)):
        raise ValueError("answer must be a list of boxes or of {'bbox_2d': [...], 'label': ...}")
    for i, (box, _) in enumerate(_gold_items(answer)):
        if to_abs(box, params, is_answer=True) is None:
            raise ValueError(f"answer[{i}] is not a non-degenerate box: {box!r}")


def _norm_label(label: Optional[str]) -> Optional[str]:
    return None if label is None else " ".join(label.lower().split())


def match_boxes(preds: Sequence, golds: Sequence, thr: float,
                pred_labels=None, gold_labels=None) -> List[Tuple[int, int, float]]:
    """``[(pred_idx, gold_idx, iou)]``: one-to-one pairs with IoU >= ``thr`` (labels equal if
    given), chosen to maximise their number and then their total IoU."""
    n = max(len(preds), len(golds))
    ious = [[0.0 if (pred_labels is not None and pred_labels[i] != gold_labels[j]) or p is None
             else iou(p, g) for j, g in enumerate(golds)] for i, p in enumerate(preds)]
    weights = [[(1.0 + v / (n + 1)) if v >= thr and v > 0 else 0.0 for v in row] for row in ious]
    return [(i, j, ious[i][j]) for i, j in max_weight_matching(weights)]


@register_verifier("detection", params=GEOMETRY_PARAMS + (
    "metric", "iou_threshold", "schedule", "use_labels", "max_boxes", "fallback"), check=_check)
def score_detection(answer: Any, response: str, params: Mapping[str, Any], ctx: Context) -> float:
    gold_items = _gold_items(answer)
    golds = [to_abs(b, params, is_answer=True) for b, _ in gold_items]
    span = answer_span(response, params.get("fallback", "full"), prefer_boxed=False,
                       tail_chars=_SPAN_CHARS, span_chars=_SPAN_CHARS)
    cap = int(params.get("max_boxes", _DEFAULT_MAX_BOXES))
    found = parse_boxes(span, limit=cap + 1)
    if not found and not golds and span.strip() in ("", "[]", "none", "None"):
        return 1.0
    if not found:
        raise Unparsable("no box in the answer span")
    extra = max(0, len(found) - cap)  # beyond the cap: unparsed, still false positives
    found = found[:cap]
    preds = [to_abs(b, params, is_answer=False) for b, _ in found]
    use_labels = params.get("use_labels", bool(gold_items) and all(l is not None for _, l in gold_items))
    thr = params.get("iou_threshold")
    if thr is None:
        thr = threshold_at(ctx.progress, params.get("schedule") or VTRIUNE_SCHEDULE)
    labels = ([_norm_label(l) for _, l in found], [_norm_label(l) for _, l in gold_items]) \
        if use_labels else (None, None)
    pairs = match_boxes(preds, golds, float(thr), *labels)
    n_pred, n_gold = len(preds) + extra, len(golds)
    if params.get("metric", "f1") == "mean_iou":
        return sum(v for _, _, v in pairs) / max(n_pred, n_gold, 1)
    tp = len(pairs)
    return 2.0 * tp / (n_pred + n_gold) if n_pred + n_gold else 1.0
