"""``ocr``: text read from an image, exact or by normalised edit-distance similarity.

answer: the reference text, or a list of acceptable texts (the best one counts).
params:
  mode          ``similarity`` (default): ``1 - lev(a, b) / max(len(a), len(b))`` after
                normalisation (1.0 when both are empty) | ``exact``: 1 if the normalised texts
                are equal.
  case          fold case (default True).
  whitespace    collapse runs of whitespace to one space and strip (default True).
  punctuation   drop punctuation characters (default True).
  fallback      where to look without ``<answer>``/``\\boxed``: ``full`` (default) |
                ``last_line`` | ``none``.
  max_chars     texts are cut to this many characters before comparison (default 2000; keeps
                the O(n*m) edit distance bounded; at most 2048, the answer-span cap).
"""
from __future__ import annotations

import unicodedata
from typing import Any, Mapping

from dualrpo_mcore.verifiers.base import (
    Context, param_bool, param_choice, param_int, register_verifier,
)
from dualrpo_mcore.verifiers.extract import FALLBACKS, MAX_SPAN_CHARS, answer_span

_DEFAULT_MAX = 2000


def normalise(text: str, *, case: bool = True, whitespace: bool = True,
              punctuation: bool = True) -> str:
    if case:
        text = text.casefold()
    if punctuation:
        text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text)
    if whitespace:
        text = " ".join(text.split())
    return text


def similarity(a: str, b: str) -> float:
    from rapidfuzz.distance import Levenshtein

    if not a and not b:
        return 1.0
    return 1.0 - Levenshtein.distance(a, b) / max(len(a), len(b))


def _check(answer: Any, params: Mapping[str, Any]) -> None:
    param_choice(params, "mode", ("similarity", "exact"), "similarity")
    param_choice(params, "fallback", FALLBACKS, "full")
    for key in ("case", "whitespace", "punctuation"):
        param_bool(params, key, True)
    param_int(params, "max_chars", _DEFAULT_MAX, lo=1, hi=MAX_SPAN_CHARS)
    if isinstance(answer, str):
        return
    if not isinstance(answer, (list, tuple)) or not answer or not all(isinstance(a, str) for a in answer):
        raise ValueError("answer must be a string or a non-empty list of strings")


@register_verifier("ocr", params=("mode", "case", "whitespace", "punctuation", "fallback",
                                  "max_chars"), check=_check)
def score_ocr(answer: Any, response: str, params: Mapping[str, Any], ctx: Context) -> float:
    cap = int(params.get("max_chars", _DEFAULT_MAX))
    opts = {k: params.get(k, True) for k in ("case", "whitespace", "punctuation")}
    # answer_span caps at the response tail already; the prediction is cut again after
    # normalisation so that both sides obey the same bound
    pred = normalise(answer_span(response, params.get("fallback", "full"))
                     [-4 * cap:], **opts)[:cap]
    exact = params.get("mode", "similarity") == "exact"
    best = 0.0
    for ref in ([answer] if isinstance(answer, str) else answer):
        ref_n = normalise(ref[:4 * cap], **opts)[:cap]
        best = max(best, float(ref_n == pred) if exact else similarity(ref_n, pred))
    return best
