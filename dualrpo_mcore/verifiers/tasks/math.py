"""``math``: final-answer equivalence (symbolic and numeric), safe against hostile output.

answer: the ground truth as LaTeX or plain text (``"\\frac{1}{2}"``, ``"0.5"``, ``"[1,2)"``,
``"\\{1,2\\}"``, ``"30^\\circ"``, ``"45\\%"``, ``"x \\geq 5"``, ``"(2, 2), (6, 2)"``), a number,
or a worked solution whose final answer is boxed or stated ("The final answer is $28\\%$").
params:
  fallback  where the answer is read when the response has neither ``\\boxed{}`` nor
            ``<answer>``: ``none`` (default: 0, the model must mark its answer) | ``last_line``
            | ``full``.
  rel_tol   relative tolerance when both sides evaluate to real numbers and one of them is a
            decimal (default 1e-6); two exact rationals must be equal exactly.

Reading. The span is the last ``<answer>`` block, else the response tail when it holds a closed
``\\boxed{}``, else the fallback. Inside it (and inside the gold, which may be a whole solution)
:mod:`math_extract` finds the answer, in the order its docstring gives. Several answers
(``\\boxed{1}, \\boxed{2}``, ``1, 2``, ``$1$ and $2$``) form one multi-answer: when the gold
holds several answers, every one must be present and nothing extra, in any order; a single gold
answer is never matched by a list that contains it. Number formats: ``1,000`` / ``1 000`` /
``32,\\! 349`` are thousands; a comma before 2+ digits (``2,74``, ``1000,99``, not ``1,234``) is a
decimal comma in plain text only, since in LaTeX ``1,2`` is a list.

Comparing. Numbers are compared by value (0.5 = 1/2 = ``\\dfrac12``; a percentage equals both its
value and its value / 100: ``45.2\\%`` equals 0.452 and 45.2. math-verify does that for whole
percentages only (``50\\%`` = 50 = 0.5), its ``45.2\\%`` equals 0.452 but not 45.2; the
``vtriune_math`` verifier keeps math-verify's rule). Everything else (sets, intervals, tuples,
matrices, relations, expressions) goes to math-verify's comparison of the sympy objects built here,
at its default rounding (6 decimals). Two answers whose normalised text is identical score 1 even
when neither parses; a gold whose answer does not parse can only be matched that way.

What comes from math-verify 0.9.0 / latex2sympy2_extended, and what is ours:

* used, string-level only: ``latex2sympy2_extended.math_normalization.normalize_latex`` (regex
  rewrites: ``\\left``/``\\right``, ``\\dfrac``, units, ``and``/``or`` -> ``,``, malformed
  ``\\frac12``/``\\sqrt3``; no eval anywhere in that module);
* used, on objects we built: ``math_verify.grader.verify`` (``simplify``, ``solve``, set and
  relation logic on sympy objects; strings it is given are only compared with ``==``), with its
  signal-based timeout off (SIGALRM does not work off the main thread; the pool bounds our time);
* not used: ``math_verify.parse`` and its ``ExprExtractionConfig`` path call sympy's
  ``parse_expr``, which runs ``eval`` on the text, and ``latex2sympy2_extended``'s
  ``parse_number``/``convert_number`` call ``sympy.Number(str)``, which sympifies. Our extraction
  (``math_extract``, plain scans in place of math-verify's regexes) and our parser
  (``math_parse``: plain text rewritten to LaTeX, a cost guard, the ANTLR grammar with number
  tokens built without ``sympify``) replace them. Model text is never evaluated as code.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import re
from typing import Any, Mapping, NamedTuple, Optional

from dualrpo_mcore.verifiers.base import (
    Context, Unparsable, param_choice, param_number, register_verifier,
)
from dualrpo_mcore.verifiers.extract import FALLBACKS, fallback_span, last_answer_tag, tail
from dualrpo_mcore.verifiers.math_extract import Found, box_group, find_answers
from dualrpo_mcore.verifiers.math_parse import MAX_ANSWER_CHARS, clean, to_sympy

_PCT_SCALE = 100
MAX_GOLD_CHARS = 20_000
# The <answer> block may start long before the tail that answers are read from.
_TAG_WINDOW = 1 << 16
_DECIMAL_COMMA = re.compile(r"-?(\d+),(\d+)")
_MAX_FOUND = 24


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


def math_verify_equal(gold, pred) -> bool:
    """math-verify's comparison of two sympy objects (also ``vtriune_math``'s)."""
    from math_verify.grader import verify as mv_verify

    # timeout_seconds=None: no SIGALRM (breaks off the main thread); the pool bounds our time
    logging.getLogger("math_verify.grader").setLevel(logging.ERROR)
    return bool(mv_verify(gold, pred, timeout_seconds=None, raise_on_error=False))


def same_object(gold, pred, rel_tol: float = 1e-6) -> bool:
    """Whether two parsed answers denote the same mathematical object."""
    same = _numbers_equal(gold, pred, rel_tol)
    if same is not None:
        return same
    return math_verify_equal(gold, pred)


# ---------------------------------------------------------------------------------------------
# reading an answer out of a span

def _parse_part(text: str, plain: bool):
    m = _DECIMAL_COMMA.fullmatch(text.strip()) if plain else None
    if m and len(m.group(2)) >= 2 and (len(m.group(2)) != 3 or m.group(1) == "0"):
        text = text.strip().replace(",", ".")  # "2,74" in plain text is a decimal comma
    return to_sympy(text)


class Reading(NamedTuple):
    """An answer read from a span: its object (None when nothing found parsed), the normalised
    text of the first place found (None when nothing looked like an answer), and why the first
    place did not parse."""

    obj: Optional[object]
    key: Optional[str]
    error: str = ""


def _parse_found(found: Found):
    """The sympy object of one found answer (a multi-answer becomes a set); raises Unparsable."""
    from latex2sympy2_extended.sets import FiniteSet
    import sympy

    if found.joined and len(found.parts) > 1:
        with contextlib.suppress(Unparsable):
            return to_sympy(",".join(found.parts))
    parsed = [_parse_part(part, found.plain) for part in found.parts]
    if len(parsed) == 1:
        return parsed[0]
    elements = []
    for p in parsed:
        elements.extend(p.args if isinstance(p, sympy.FiniteSet) else [p])
    return FiniteSet(*elements)


def _key(found: Found) -> str:
    """Normalised text of a found answer, for the identical-text rule."""
    return ",".join(" ".join(clean(p).split()) for p in found.parts)


def read_answer(text: str) -> Reading:
    """The first found answer that parses, with the text of the first one found."""
    key, error = None, ""
    for k, found in enumerate(find_answers(text)):
        if k >= _MAX_FOUND:
            break
        if key is None:
            key = _key(found)
        try:
            return Reading(_parse_found(found), key, error)
        except Unparsable as e:
            error = error or str(e)
    return Reading(None, key, error)


@functools.lru_cache(maxsize=256)
def _read_gold(gold_text: str) -> Reading:
    return read_answer(gold_text)


def clear_caches() -> None:
    """Forget parsed golds and answers (benchmarks measure cold parses)."""
    _read_gold.cache_clear()
    to_sympy.cache_clear()


def equivalent(gold_text: str, pred_text: str, rel_tol: float = 1e-6) -> bool:
    """Whether two answer strings (or spans holding one) denote the same answer."""
    gold, gold_key, _ = _read_gold(gold_text)
    pred, pred_key, _ = read_answer(pred_text)
    if gold_key and gold_key == pred_key:
        return True
    return gold is not None and pred is not None and same_object(gold, pred, rel_tol)


# ---------------------------------------------------------------------------------------------

def _span(response: str, fallback: str) -> str:
    """The text the answer is read from: the last <answer> block, else a tail holding a closed
    box, else the fallback's choice."""
    window = response[-_TAG_WINDOW:]
    tagged = last_answer_tag(window)
    if tagged is not None:
        return tagged
    text = tail(response)
    if box_group(text) is not None:
        return text
    return fallback_span(text, fallback)


def _gold_text(answer: Any) -> str:
    if isinstance(answer, bool):
        raise ValueError("answer must be a string or a number, got a bool")
    if isinstance(answer, (int, float)):
        if not math.isfinite(answer):
            raise ValueError(f"answer must be finite, got {answer!r}")
        return repr(answer) if isinstance(answer, float) else str(answer)
    if isinstance(answer, str) and answer.strip():
        if len(answer) > MAX_GOLD_CHARS:
            raise ValueError(f"answer longer than {MAX_GOLD_CHARS} chars")
        return answer
    raise ValueError(f"answer must be a non-empty string or a number, got {answer!r}")


def _check(answer: Any, params: Mapping[str, Any]) -> None:
    param_choice(params, "fallback", FALLBACKS, "none")
    param_number(params, "rel_tol", lo=0.0, hi=0.1, default=1e-6)
    _gold_text(answer)


@register_verifier("math", params=("fallback", "rel_tol"), check=_check)
def score_math(answer: Any, response: str, params: Mapping[str, Any], ctx: Context) -> float:
    gold_text = _gold_text(answer)
    gold, gold_key, _ = _read_gold(gold_text)
    if gold is None and not gold_key:
        raise ValueError(f"gold answer {gold_text[:80]!r}: no answer found in it")
    pred, pred_key, error = read_answer(_span(response, params.get("fallback", "none")))
    if gold_key and gold_key == pred_key:
        return 1.0
    if pred is None:
        raise Unparsable(error or "no answer found in the answer span")
    if gold is None:
        return 0.0
    return float(same_object(gold, pred, float(params.get("rel_tol", 1e-6))))


__all__ = ["equivalent", "same_object", "read_answer", "clear_caches", "MAX_ANSWER_CHARS"]
