"""``numeric``: a number within tolerance (chart QA and other numeric answers).

answer: a number, or a string such as ``"1,234.5"``, ``"45%"``, ``"3/4"``.
params:
  rel_tol   relative tolerance, default 0.05: ChartQA's "relaxed accuracy" (5 %), the usual
            metric for chart answers read off a plot.
  abs_tol   absolute tolerance, default 1e-9 (so that a gold 0 is reachable).
  percent   how a ``%`` answer compares: ``both`` (default; ``45%`` matches 45 and 0.45),
            ``divide`` (``45%`` is 0.45 only) or ``ignore`` (``45%`` is 45 only).
  fallback  where to look without ``\\boxed``/``<answer>``: ``last_line`` (default) | ``full`` |
            ``none``. The *last* number of the span is the prediction.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping, Optional, Tuple

from dualrpo_mcore.verifiers.base import (
    Context, Unparsable, param_choice, param_number, register_verifier,
)
from dualrpo_mcore.verifiers.extract import FALLBACKS, answer_span, find_numbers, strip_latex_text

PERCENT_MODES = ("both", "divide", "ignore")
_FRAC = re.compile(r"\\d?frac\s*\{\s*(-?\d+(?:\.\d+)?)\s*\}\s*\{\s*(-?\d+(?:\.\d+)?)\s*\}")
_SLASH = re.compile(r"(?<![\w.])(-?\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)(?![\w.])")


def parse_number(text: str) -> Optional[Tuple[float, bool]]:
    """Last number in ``text`` as ``(value, is_percent)``; simple fractions count as numbers."""
    text = strip_latex_text(text).replace("\\,", "").replace("\\!", "").replace("{,}", ",")
    last = None
    for rx in (_FRAC, _SLASH):
        for m in rx.finditer(text):
            den = float(m.group(2))
            if den != 0:
                last = max(last or (None, -1), (float(m.group(1)) / den, m.end()), key=lambda t: t[1])
    nums = find_numbers(text)
    if nums and (last is None or nums[-1][3] > last[1]):
        val, pct = nums[-1][0], nums[-1][1]
        return (val, pct) if math.isfinite(val) else None
    return (last[0], False) if last is not None else None


def candidates(value: float, is_percent: bool, mode: str):
    if not is_percent or mode == "ignore":
        return (value,)
    if mode == "divide":
        return (value / 100.0,)
    return (value, value / 100.0)


def close(a: float, b: float, rel_tol: float, abs_tol: float) -> bool:
    # relative to the gold value (not symmetric like math.isclose): the tolerance is a property of
    # the answer, and a prediction of 0 must not widen it
    return abs(a - b) <= max(rel_tol * abs(b), abs_tol)


def _gold(answer: Any) -> Tuple[float, bool]:
    if isinstance(answer, bool):
        raise ValueError("answer must be a number or a numeric string, got a bool")
    if isinstance(answer, (int, float)):
        if not math.isfinite(answer):
            raise ValueError(f"answer must be finite, got {answer!r}")
        return float(answer), False
    if isinstance(answer, str):
        parsed = parse_number(answer)
        if parsed is not None:
            return parsed
    raise ValueError(f"answer must be a number or a numeric string, got {answer!r}")


def _check(answer: Any, params: Mapping[str, Any]) -> None:
    param_number(params, "rel_tol", lo=0.0, default=0.05)
    param_number(params, "abs_tol", lo=0.0, default=1e-9)
    param_choice(params, "percent", PERCENT_MODES, "both")
    param_choice(params, "fallback", FALLBACKS, "last_line")
    _gold(answer)


@register_verifier("numeric", params=("rel_tol", "abs_tol", "percent", "fallback"), check=_check)
def score_numeric(answer: Any, response: str, params: Mapping[str, Any], ctx: Context) -> float:
    rel_tol = float(params.get("rel_tol", 0.05))
    abs_tol = float(params.get("abs_tol", 1e-9))
    mode = params.get("percent", "both")
    gold_v, gold_pct = _gold(answer)
    pred = parse_number(answer_span(response, params.get("fallback", "last_line")))
    if pred is None:
        raise Unparsable("no number in the answer span")
    return float(any(close(p, g, rel_tol, abs_tol)
                     for p in candidates(pred[0], pred[1], mode)
                     for g in candidates(gold_v, gold_pct, mode)))
