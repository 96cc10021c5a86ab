"""``grounding``: IoU of the one predicted box with the ground-truth box.

answer: ``[x1, y1, x2, y2]`` (or ``{"bbox_2d": [...]}``) in ``answer_coords``.
params (plus the coordinate params of ``geometry_params``):
  threshold  None (default): the reward is the IoU itself; a number t in (0, 1]: reward 1 if
             IoU >= t else 0.
  fallback   ``full`` (default) | ``last_line`` | ``none``: where to look without ``<answer>``.
The *first* box of the answer span is the prediction (a grounding answer names one box; later
boxes are usually the model restating or listing alternatives). Malformed or degenerate boxes
(x2 <= x1, y2 <= y1, non-finite) score 0.
"""
from __future__ import annotations

from typing import Any, Mapping

from dualrpo_mcore.verifiers.base import (
    Context, Unparsable, param_choice, param_number, register_verifier,
)
from dualrpo_mcore.verifiers.boxes import box_and_label, iou, parse_boxes
from dualrpo_mcore.verifiers.extract import FALLBACKS, answer_span
from dualrpo_mcore.verifiers.geometry_params import GEOMETRY_PARAMS, check_geometry, to_abs


def _raw_answer(answer: Any):
    if isinstance(answer, Mapping):
        return box_and_label(answer)[0]
    if isinstance(answer, (list, tuple)) and len(answer) == 1 and isinstance(answer[0], (list, tuple, Mapping)):
        return _raw_answer(answer[0])
    return answer


def _check(answer: Any, params: Mapping[str, Any]) -> None:
    check_geometry(params)
    param_number(params, "threshold", lo=0.0, hi=1.0, allow_none=True)
    param_choice(params, "fallback", FALLBACKS, "full")
    if to_abs(_raw_answer(answer), params, is_answer=True) is None:
        raise ValueError(f"answer must be a non-degenerate box [x1, y1, x2, y2], got {answer!r}")


@register_verifier("grounding", params=GEOMETRY_PARAMS + ("threshold", "fallback"), check=_check)
def score_grounding(answer: Any, response: str, params: Mapping[str, Any], ctx: Context) -> float:
    gold = to_abs(_raw_answer(answer), params, is_answer=True)
    if gold is None:
        raise ValueError("gold box is degenerate")
    found = parse_boxes(answer_span(response, params.get("fallback", "full"), prefer_boxed=False),
                        limit=1)
    if not found:
        raise Unparsable("no box in the answer span")
    pred = to_abs(found[0][0], params, is_answer=False)
    if pred is None:
        return 0.0
    value = iou(pred, gold)
    thr = params.get("threshold")
    return value if thr is None else float(value >= thr)
