"""``choice``: multiple choice by letter or by option text (puzzle, science).

answer: a letter (``"B"``, ``"(B)"``) or the text of the right option.
params:
  options   list of option texts (lettered A, B, ... in order) or dict letter -> text; needed to
            accept an answer given as option text, and to restrict letters to the valid ones.
  fallback  where to look without ``\\boxed``/``<answer>``: ``full`` (default; the response
            tail) | ``last_line`` | ``none``.
"""
from __future__ import annotations

import re
import string
from typing import Any, Dict, Mapping, Optional

from dualrpo_mcore.verifiers.base import Context, Unparsable, param_choice, register_verifier
from dualrpo_mcore.verifiers.extract import FALLBACKS, answer_span, strip_latex_text

_LETTERS = string.ascii_uppercase
_MAX_OPTION_CHARS = 500

# The whole span is a (decorated) letter: "B", "(B)", "B.", "B)", "[B]", "**B**", "Option B".
_ONLY_LETTER = re.compile(r"^\W{0,3}(?:option|choice)?\s*\(?\[?([A-Za-z])\]?\)?\W{0,3}$", re.I)
# "answer is (B)", "Answer: B", "the correct option is C"
_ANSWER_IS = re.compile(
    r"(?:answer|option|choice)\s*(?:is|:|=)?\s*(?:option|choice)?\s*:?\s*"
    r"[\(\[*]{0,2}((?-i:[A-Z]))(?![A-Za-z])", re.I)
# "B. Paris", "(B) Paris", "B) Paris" at the start of the span
_LEADING = re.compile(r"^\W{0,3}\(?([A-Z])(?:[.):\]]|\s*-)\s")
_PAREN = re.compile(r"\(([A-Z])\)")


def _norm_text(s: str) -> str:
    s = strip_latex_text(s).lower()
    s = re.sub(r"[^\w\s]", " ", s)
    return " ".join(s.split())


def _options(params: Mapping[str, Any]) -> Optional[Dict[str, str]]:
    opts = params.get("options")
    if opts is None:
        return None
    if isinstance(opts, Mapping):
        return {str(k).strip().upper(): str(v) for k, v in opts.items()}
    return {_LETTERS[i]: str(v) for i, v in enumerate(opts)}


def _check(answer: Any, params: Mapping[str, Any]) -> None:
    param_choice(params, "fallback", FALLBACKS, "full")
    opts = params.get("options")
    if opts is not None:
        if isinstance(opts, Mapping):
            bad = [k for k in opts if not (isinstance(k, str) and len(k.strip()) == 1
                                           and k.strip().upper() in _LETTERS)]
            if bad:
                raise ValueError(f"params.options: keys must be single letters, got {bad[0]!r}")
        elif not isinstance(opts, (list, tuple)) or not 0 < len(opts) <= 26:
            raise ValueError("params.options must be a dict letter->text or a list of 1..26 texts")
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError("answer must be a non-empty string (a letter or an option text)")
    if _gold_letter(answer, _options(params)) is None and opts is not None:
        raise ValueError(f"answer {answer!r} is neither a letter nor one of params.options")


def _gold_letter(answer: str, opts: Optional[Dict[str, str]]) -> Optional[str]:
    m = _ONLY_LETTER.match(answer.strip())
    if m and (opts is None or m.group(1).upper() in opts):
        return m.group(1).upper()
    if opts:
        key = _norm_text(answer)
        for letter, text in opts.items():
            if _norm_text(text) == key:
                return letter
    return None


def _letter_from_text(span: str, opts: Dict[str, str]) -> Optional[str]:
    """The option whose text the span states: exact match, else the single option it contains."""
    key = _norm_text(span[-_MAX_OPTION_CHARS * 4:])
    texts = {letter: _norm_text(t) for letter, t in opts.items()}
    for letter, t in texts.items():
        if t and t == key:
            return letter
    inside = [letter for letter, t in texts.items()
              if t and re.search(r"(?<!\w)" + re.escape(t) + r"(?!\w)", key)]
    # longest-text tie-break: "red apple" beats "apple" when both occur
    inside.sort(key=lambda k: -len(texts[k]))
    if len(inside) == 1 or (len(inside) > 1 and all(texts[o] in texts[inside[0]] for o in inside[1:])):
        return inside[0]
    return None


def _pred_letter(span: str, opts: Optional[Dict[str, str]]) -> Optional[str]:
    valid = set(opts) if opts else set(_LETTERS)
    # single spaces only: keeps the optional-\s* regexes below free of polynomial backtracking
    span = " ".join(strip_latex_text(span).split())
    m = _ONLY_LETTER.match(span)
    if m and m.group(1).upper() in valid:
        return m.group(1).upper()
    hits = [x.upper() for x in _ANSWER_IS.findall(span) if x.upper() in valid]
    if hits:
        return hits[-1]
    m = _LEADING.match(span)
    if m and m.group(1) in valid:
        return m.group(1)
    if opts:
        letter = _letter_from_text(span, opts)
        if letter is not None:
            return letter
    hits = [x for x in _PAREN.findall(span) if x in valid]
    return hits[-1] if hits else None


@register_verifier("choice", params=("options", "fallback"), check=_check)
def score_choice(answer: Any, response: str, params: Mapping[str, Any], ctx: Context) -> float:
    opts = _options(params)
    gold = _gold_letter(str(answer), opts)
    span = answer_span(response, params.get("fallback", "full"))
    pred = _pred_letter(span, opts)
    if gold is None:  # no options and a textual answer: compare texts
        return float(_norm_text(span) == _norm_text(str(answer)))
    if pred is None:
        raise Unparsable("no option letter or option text found")
    return float(pred == gold)
