"""``math``: final-answer equivalence (symbolic and numeric), safe against hostile output.

answer: the ground truth as LaTeX or plain text (``"\\frac{1}{2}"``, ``"0.5"``, ``"[1,2)"``,
``"\\{1,2\\}"``, ``"30^\\circ"``, ``"45\\%"``) or a number.
params:
  fallback  where the answer is read when the response has neither ``\\boxed{}`` nor
            ``<answer>``: ``none`` (default: 0, the model must mark its answer) | ``last_line``
            | ``full``.
  rel_tol   relative tolerance when both sides evaluate to real numbers and one of them is a
            decimal (default 1e-6); two exact rationals must be equal exactly.

Extraction takes the last ``<answer>`` block (its last ``\\boxed`` if any), else the last
``\\boxed{}`` with balanced braces. Numbers are compared by value (0.5 = 1/2 = ``\\dfrac12``;
``50\\%`` equals both 0.5 and 50, as math-verify does); everything else (sets, intervals, tuples,
equations, expressions) goes to math-verify's comparison of the already-built sympy objects, with
its signal-based timeout disabled (the pool's time budget bounds us instead; SIGALRM does not work
off the main thread).
"""
from __future__ import annotations

import logging
import math
import re
from typing import Any, Mapping, Optional

from dualrpo_mcore.verifiers.base import (
    Context, Unparsable, param_choice, param_number, register_verifier,
)
from dualrpo_mcore.verifiers.extract import FALLBACKS, answer_span
from dualrpo_mcore.verifiers.math_parse import MAX_ANSWER_CHARS, to_sympy

_PCT_SCALE = 100
# "The final answer is: 1/2" -> "1/2" (spans read without \boxed/<answer>, e.g. fallback last_line)
_ANSWER_PREFIX = re.compile(r"(?:answer|result)(?: is)?(?: ?[:=])? ?", re.I)


def _numeric_values(expr) -> Optional[list]:
    """Real values an expression may stand for (a percent stands for v/100 and v), or None."""
    import sympy

    if not isinstance(expr, sympy.Expr) or expr.free_symbols:
        return None
    has_pct = any(isinstance(a, sympy.UnevaluatedExpr) and a.args[0] == sympy.Rational(1, 100)
                  for a in sympy.preorder_traversal(expr))
    exact = not expr.has(sympy.Float)
    try:
        val = expr.doit()
        if not val.is_number:
            return None
        v = complex(val.evalf(30))
    except (TypeError, ValueError, OverflowError, ZeroDivisionError, AttributeError):
        return None
    if v.imag != 0 or not math.isfinite(v.real):
        return None
    out = [(v.real, exact, val)]
    if has_pct:
        out.append((v.real * _PCT_SCALE, exact, val * _PCT_SCALE))
    return out


def _numbers_equal(a, b, rel_tol: float) -> Optional[bool]:
    """Equality of two numeric expressions, or None when either side is not a plain number."""
    va, vb = _numeric_values(a), _numeric_values(b)
    if va is None or vb is None:
        return None
    for xa, exact_a, sa in va:
        for xb, exact_b, sb in vb:
            if exact_a and exact_b and sa.is_Rational and sb.is_Rational:
                if sa == sb:
                    return True
            elif abs(xa - xb) <= rel_tol * max(abs(xa), abs(xb)) or xa == xb:
                return True
    return False


def _math_verify_equal(gold, pred) -> bool:
    from math_verify.grader import verify as mv_verify

    # timeout_seconds=None: no SIGALRM (breaks off the main thread); the pool bounds our time
    logging.getLogger("math_verify.grader").setLevel(logging.ERROR)
    return bool(mv_verify(gold, pred, timeout_seconds=None, raise_on_error=False))


def equivalent(gold_text: str, pred_text: str, rel_tol: float = 1e-6) -> bool:
    """Whether two answer strings denote the same mathematical object (gold parse must work)."""
    gold = to_sympy(gold_text)
    pred = to_sympy(pred_text)
    same = _numbers_equal(gold, pred, rel_tol)
    if same is not None:
        return same
    return _math_verify_equal(gold, pred)


def _gold_text(answer: Any) -> str:
    if isinstance(answer, bool):
        raise ValueError("answer must be a string or a number, got a bool")
    if isinstance(answer, (int, float)):
        if not math.isfinite(answer):
            raise ValueError(f"answer must be finite, got {answer!r}")
        return repr(answer) if isinstance(answer, float) else str(answer)
    if isinstance(answer, str) and answer.strip():
        if len(answer) > MAX_ANSWER_CHARS:
            raise ValueError(f"answer longer than {MAX_ANSWER_CHARS} chars")
        return answer
    raise ValueError(f"answer must be a non-empty string or a number, got {answer!r}")


def _check(answer: Any, params: Mapping[str, Any]) -> None:
    param_choice(params, "fallback", FALLBACKS, "none")
    param_number(params, "rel_tol", lo=0.0, hi=0.1, default=1e-6)
    _gold_text(answer)


@register_verifier("math", params=("fallback", "rel_tol"), check=_check)
def score_math(answer: Any, response: str, params: Mapping[str, Any], ctx: Context) -> float:
    gold_text = _gold_text(answer)
    span = " ".join(answer_span(response, params.get("fallback", "none")).split())
    prefix = None
    for prefix in _ANSWER_PREFIX.finditer(span):
        pass
    if prefix is not None and prefix.end() < len(span):
        span = span[prefix.end():]
    try:
        to_sympy(gold_text)
    except Unparsable as e:
        raise ValueError(f"gold answer {gold_text[:80]!r} does not parse: {e}") from None
    return float(equivalent(gold_text, span, float(params.get("rel_tol", 1e-6))))
