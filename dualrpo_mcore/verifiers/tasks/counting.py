"""``counting``: an integer count, written in digits or in English words.

answer: a non-negative integer (or a string of one).
params:
  fallback  where to look without ``\\boxed``/``<answer>``: ``last_line`` (default) | ``full`` |
            ``none``. The *last* number (digits or words, e.g. "twenty-one", "one hundred and
            five", "a dozen") in the span is the prediction.
"""
from __future__ import annotations

import re
from typing import Any, List, Mapping, Optional

from dualrpo_mcore.verifiers.base import Context, Unparsable, param_choice, register_verifier
from dualrpo_mcore.verifiers.extract import FALLBACKS, answer_span, strip_latex_text

_UNITS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen".split())}
_TENS = {w: 10 * (i + 2) for i, w in enumerate(
    "twenty thirty forty fifty sixty seventy eighty ninety".split())}
_SCALES = {"hundred": 100, "thousand": 1000, "million": 10 ** 6}
_TOKEN = re.compile(r"[a-z]+|\d[\d,]*(?:\.\d+)?")
_MAX_TOKENS = 2000


def _is_word_number(tok: str) -> bool:
    return tok in _UNITS or tok in _TENS or tok in _SCALES or tok == "dozen"


def _words_value(words: List[str]) -> Optional[int]:
    """Value of a run of number words ("one hundred and five", "twenty one", "a dozen")."""
    total, current, seen = 0, 0, False
    for w in words:
        if w in ("a", "and"):
            continue
        if w in _UNITS:
            current += _UNITS[w]
        elif w in _TENS:
            current += _TENS[w]
        elif w == "dozen":
            current = (current or 1) * 12
        elif w == "hundred":
            current = (current or 1) * 100
        elif w in _SCALES:
            total += (current or 1) * _SCALES[w]
            current = 0
        else:
            return None
        seen = True
    return total + current if seen else None


def last_count(text: str) -> Optional[int]:
    """The last integer in ``text``: digits (``1,024``, ``7.0``) or a run of number words."""
    text = strip_latex_text(text).lower().replace("-", " ")
    tokens = _TOKEN.findall(text)[-_MAX_TOKENS:]
    i = len(tokens) - 1
    while i >= 0:
        tok = tokens[i]
        if tok[0].isdigit():
            num = tok.replace(",", "")
            if "." in num:
                whole, frac = num.split(".", 1)
                return int(whole) if set(frac) <= {"0"} and len(whole) < 19 else None
            return int(num) if len(num) < 19 else None
        if _is_word_number(tok):
            j = i
            while j - 1 >= 0 and (_is_word_number(tokens[j - 1]) or tokens[j - 1] in ("a", "and")):
                j -= 1
            return _words_value(tokens[j:i + 1])
        if tok in ("none", "no") and i == len(tokens) - 1:
            return 0
        i -= 1
    return None


def _gold(answer: Any) -> int:
    if isinstance(answer, bool):
        raise ValueError("answer must be a non-negative integer, got a bool")
    if isinstance(answer, int) and answer >= 0:
        return answer
    if isinstance(answer, float) and answer.is_integer() and answer >= 0:
        return int(answer)
    if isinstance(answer, str):
        val = last_count(answer)
        if val is not None:
            return val
    raise ValueError(f"answer must be a non-negative integer, got {answer!r}")


def _check(answer: Any, params: Mapping[str, Any]) -> None:
    param_choice(params, "fallback", FALLBACKS, "last_line")
    _gold(answer)


@register_verifier("counting", params=("fallback",), check=_check)
def score_counting(answer: Any, response: str, params: Mapping[str, Any], ctx: Context) -> float:
    pred = last_count(answer_span(response, params.get("fallback", "last_line")))
    if pred is None:
        raise Unparsable("no count in the answer span")
    return float(pred == _gold(answer))
