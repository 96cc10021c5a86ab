"""``vtriune_math``: V-Triune's ``mathverify`` verifier (math, puzzle, science, chart, OCR and
counting rows).

answer: the row's ``reward_model.ground_truth`` as published (``\\boxed{45.2}``, ``\\boxed{A}``,
``12``, a worked solution, ...). params: ``accuracy_ratio``, ``format_ratio`` (see
``vtriune_common``).

Format and accuracy as theirs, what runs here (math-verify's own extraction regexes, its
normalisation and comparison; our converter; never ``eval``) and where it still differs:
docs/vtriune.md. Left out there: the gold is read as math-verify's default ``parse`` reads it
(LaTeX environments, ``\\boxed{}``, "answer: ..." and plain numbers or arithmetic, first match),
and a gold from which nothing is read gives 0; of the response's candidates the rightmost-*ending*
one is taken; the regexes are built for the two configurations their verifier uses.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import re
from dataclasses import replace
from typing import Any, List, Mapping, Optional, Tuple

from dualrpo_mcore.verifiers.base import Context, Unparsable, register_verifier
from dualrpo_mcore.verifiers.tasks.math import MAX_GOLD_CHARS, math_verify_equal
from dualrpo_mcore.verifiers.vtriune_common import RATIO_PARAMS, combine, ratios

_TAGS = ("<think>\n", "\n</think>\n", "\n<answer>\n", "\n</answer>")
_INT = re.compile(r"[-+]?\d+")
_DECIMAL = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)")


def format_score(response: str) -> float:
    return sum(0.25 for tag in _TAGS if response.count(tag) == 1)


# ---------------------------------------------------------------------------------------------
# strings -> sympy, without eval

def _number(text: str):
    """What ``sympy.Number(text)`` gives for a digit string, built directly."""
    import sympy

    t = text.strip()
    if _INT.fullmatch(t):
        return sympy.Integer(int(t))
    if _DECIMAL.fullmatch(t):
        return sympy.Float(t)  # a string goes to mpmath's decimal reader, not to sympify
    raise Unparsable(f"not a number: {t[:40]!r}")


@functools.lru_cache(maxsize=1)
def _converter_cls():
    from latex2sympy2_extended.latex2sympy2 import _Latex2Sympy, comma_number_regex

    class VTriuneLatex2Sympy(_Latex2Sympy):
        """latex2sympy as math-verify calls it, with its two ``sympy.Number(str)`` calls (number
        tokens, and ``1,234``-style input) replaced by direct construction."""

        def parse_number(self, text):  # noqa: D401  (overrides the library method)
            text = text.replace(",", "")
            if text.isdigit():
                text = text.lstrip("0") or "0"
            return _number(text)

        def parse(self, latex_str):
            if comma_number_regex.match(latex_str):
                number = latex_str
                if "," in number and number.startswith("0"):
                    number = number.replace(",", ".")
                return _number(number.translate(str.maketrans("", "", ", ")).lstrip("0") or "0")
            return super().parse(latex_str)

    return VTriuneLatex2Sympy


def _convert(latex: str):
    from latex2sympy2_extended.latex2sympy2 import ConversionConfig
    from math_verify.grader import should_treat_as_complex

    from dualrpo_mcore.verifiers.math_parse import guard

    guard(latex)
    return _converter_cls()(None, not should_treat_as_complex(latex), False,
                            config=ConversionConfig()).parse(latex)


def parse_latex(latex: str):
    """math-verify's ``parse_latex_cached`` on our converter: the whole string, else the last
    part of an equation chain; raises on failure."""
    from math_verify.parser import get_last_eq

    try:
        return _convert(latex)
    except Exception:
        last = get_last_eq(latex)
        if last == latex:
            raise
        return _convert(last)


def _parse_arithmetic(expr: str):
    # theirs: parse_expr(expr, evaluate=False) on gold text; ours reads it as LaTeX instead
    from dualrpo_mcore.verifiers.math_parse import plain_to_latex

    return parse_latex(plain_to_latex(expr.replace("\n", " ")))


# ---------------------------------------------------------------------------------------------
# extraction: math-verify's regexes, its selection order, our parsing

@functools.lru_cache(maxsize=1)
def _targets():
    from latex2sympy2_extended import NormalizationConfig
    from math_verify.parser import ExprExtractionConfig, LatexExtractionConfig

    gold = (LatexExtractionConfig(), ExprExtractionConfig())
    pred = (LatexExtractionConfig(
        normalization_config=NormalizationConfig(nits=False, malformed_operators=False, basic_latex=True,
                                                 boxed="all", units=True),
        boxed_match_priority=0, try_extract_without_anchor=False),)
    return gold, pred


@functools.lru_cache(maxsize=2)
def _pattern_groups(which: str):
    """Patterns grouped by priority, lowest first, as math-verify orders them."""
    from math_verify.parser import get_extraction_regexes

    targets = _targets()[0 if which == "gold" else 1]
    flat = [(pat, target, prio) for pats, target in get_extraction_regexes(targets) for pat, prio in pats]
    flat.sort(key=lambda x: x[2])
    return [list(g) for _, g in itertools.groupby(flat, key=lambda x: x[2])]


def _extract_latex(match: re.Match, config) -> Tuple[Optional[object], str]:
    from latex2sympy2_extended.latex2sympy2 import convert_to_pct, normalize_latex
    from latex2sympy2_extended.sets import FiniteSet

    gd = match.groupdict()
    names = ["first_latex"] + [f"next{i}_latex" for i in range(1, 6)]
    found = [next(((v, n) for n, v in gd.items() if n.startswith(p) and v), None) for p in names]
    exprs, texts = [], []
    for latex, name in (f for f in found if f is not None):
        prefix, group = name.split("_")[0], name.split("_")[1]
        norm_cfg = config.normalization_config
        if group == "latexBoxed":
            norm_cfg = replace(norm_cfg, boxed="last")
        text = normalize_latex(latex, config=norm_cfg)
        texts.append(text)
        try:
            parsed = parse_latex(text)
            exprs.append(convert_to_pct(parsed) if gd.get(f"{prefix}_percent") else parsed)
        except Exception:
            exprs.append(None)
    if not exprs:
        return None, ""
    if len(exprs) > 1 and all(e is not None for e in exprs):
        elements = []
        for e in exprs:
            elements.extend(e.args if isinstance(e, FiniteSet) else [e])
        return FiniteSet(*elements), " and ".join(texts)
    return exprs[0], texts[0]


def _extract_expr(match: re.Match) -> Tuple[Optional[object], str]:
    from latex2sympy2_extended.latex2sympy2 import convert_to_pct

    gd = match.groupdict()
    integer = next((v for n, v in gd.items() if n.startswith("integer") and v), "")
    decimal = next((v for n, v in gd.items() if n.startswith("decimal") and v), "")
    if integer or decimal:
        integer = integer.translate(str.maketrans("", "", ", ")).lstrip("0") or "0"
        text = f"{integer}{decimal.replace(',', '.')}"
        try:
            number = _number(text)
        except Unparsable:
            return None, text
        return (convert_to_pct(number) if gd.get("percent") else number), text
    expr = gd.get("expr") or ""
    if expr:
        with contextlib.suppress(Exception):
            return _parse_arithmetic(expr), expr
    return None, expr


def extract(text: str, which: str) -> List[Any]:
    """math-verify's ``parse(text, ..., extraction_mode="first_match")`` for the gold (``which=
    "gold"``) or the response configuration: ``[object, text]``, ``[text]`` or ``[]``."""
    from math_verify.parser import LatexExtractionConfig

    for group in _pattern_groups(which):
        matches = [(m, target) for pat, target, _ in group for m in pat.finditer(text)]
        if not matches:
            continue
        matches.sort(key=lambda x: (x[0].end(), -x[0].start()), reverse=True)
        match, target = matches[0]
        if isinstance(target, LatexExtractionConfig):
            obj, fallback = _extract_latex(match, target)
        else:
            obj, fallback = _extract_expr(match)
        return ([obj] if obj is not None else []) + ([fallback] if fallback else [])
    return []


def _equal(gold: Any, pred: Any) -> bool:
    from sympy import Basic, MatrixBase

    if isinstance(gold, str) and isinstance(pred, str):
        return bool(gold.strip()) and gold.strip() == pred.strip()
    if isinstance(gold, (Basic, MatrixBase)) and isinstance(pred, (Basic, MatrixBase)):
        return math_verify_equal(gold, pred)
    return False


def _extract_or_nothing(text: str, which: str) -> List[Any]:
    try:
        return extract(text.lower(), which)
    except Exception:  # their parse() answers [] on any error: accuracy 0, the format part still counts
        return []


@functools.lru_cache(maxsize=256)
def _gold(answer: str) -> tuple:
    return tuple(_extract_or_nothing(answer, "gold"))


def accuracy_score(answer: str, response: str) -> float:
    gold = _gold(answer)
    if not gold:
        return 0.0
    pred = _extract_or_nothing(response, "pred")
    return float(any(_equal(g, p) for g in gold for p in pred))


def _check(answer: Any, params: Mapping[str, Any]) -> None:
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError(f"answer must be the ground-truth string, got {answer!r}")
    if len(answer) > MAX_GOLD_CHARS:
        raise ValueError(f"answer longer than {MAX_GOLD_CHARS} chars")
    ratios(params)


@register_verifier("vtriune_math", check=_check, params=RATIO_PARAMS)
def score_vtriune_math(answer: Any, response: str, params: Mapping[str, Any], ctx: Context) -> float:
    return combine(accuracy_score(answer, response), format_score(response), params)
