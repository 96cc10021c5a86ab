"""``format``: structure of the response (think/answer tags, or a dataset-given regex).

No ``answer`` is needed. params:
  mode       ``think_answer`` (default): the stripped response is exactly
             ``<think>...</think>`` then ``<answer>...</answer>``, optional whitespace between,
             each tag exactly once, both blocks non-empty. ``answer_only``: exactly one
             non-empty ``<answer>`` block and nothing else. ``regex``: ``pattern`` must match.
  pattern    regex for ``mode: regex`` (trusted dataset content). It is compiled once (cached)
             and applied only to responses up to ``max_chars``; longer responses score 0.
  match      ``full`` (default, ``re.fullmatch``) or ``search``.
  flags      list of flag names among ``DOTALL, IGNORECASE, MULTILINE`` (default ``[DOTALL]``).
  max_chars  default 32768.
"""
from __future__ import annotations

import functools
import re
from typing import Any, Mapping

from dualrpo_mcore.verifiers.base import (
    Context, Unparsable, param_choice, param_int, register_verifier,
)

_FLAGS = {"DOTALL": re.DOTALL, "IGNORECASE": re.IGNORECASE, "MULTILINE": re.MULTILINE}
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


@functools.lru_cache(maxsize=256)
def _compile(pattern: str, flags: int) -> re.Pattern:
    return re.compile(pattern, flags)


def _flags(params: Mapping[str, Any]) -> int:
    out = 0
    for name in params.get("flags", ["DOTALL"]):
        out |= _FLAGS[name]
    return out


def _check(answer: Any, params: Mapping[str, Any]) -> None:
    mode = param_choice(params, "mode", ("think_answer", "answer_only", "regex"), "think_answer")
    param_choice(params, "match", ("full", "search"), "full")
    param_int(params, "max_chars", 32768, lo=1)
    flags = params.get("flags", ["DOTALL"])
    if not isinstance(flags, (list, tuple)) or any(f not in _FLAGS for f in flags):
        raise ValueError(f"params.flags must be a list of {sorted(_FLAGS)}, got {flags!r}")
    if mode == "regex" or "pattern" in params:
        pattern = params.get("pattern")
        if not isinstance(pattern, str):
            raise ValueError("params.pattern must be a regex string when mode is 'regex'")
        try:
            _compile(pattern, _flags(params))
        except re.error as e:
            raise ValueError(f"params.pattern does not compile: {e}") from None


def think_answer_ok(text: str) -> bool:
    """Exact ``<think>A</think> <answer>B</answer>`` structure; linear time, no regex."""
    s = text.strip()
    if any(s.count(t) != 1 for t in _TAGS):
        return False
    if not (s.startswith("<think>") and s.endswith("</answer>")):
        return False
    t_end = s.index("</think>")
    a_start = s.index("<answer>")
    if a_start < t_end or s[t_end + len("</think>"):a_start].strip():
        return False
    think = s[len("<think>"):t_end]
    ans = s[a_start + len("<answer>"):-len("</answer>")]
    return bool(think.strip()) and bool(ans.strip())


def answer_only_ok(text: str) -> bool:
    s = text.strip()
    if s.count("<answer>") != 1 or s.count("</answer>") != 1:
        return False
    if not (s.startswith("<answer>") and s.endswith("</answer>")):
        return False
    return bool(s[len("<answer>"):-len("</answer>")].strip())


@register_verifier("format", params=("mode", "pattern", "match", "flags", "max_chars"),
                   check=_check, needs_answer=False)
def score_format(answer: Any, response: str, params: Mapping[str, Any], ctx: Context) -> float:
    mode = params.get("mode", "think_answer")
    if mode == "think_answer":
        return float(think_answer_ok(response))
    if mode == "answer_only":
        return float(answer_only_ok(response))
    if len(response) > int(params.get("max_chars", 32768)):
        raise Unparsable("response longer than params.max_chars")
    rx = _compile(params["pattern"], _flags(params))
    hit = rx.fullmatch(response) if params.get("match", "full") == "full" else rx.search(response)
    return float(hit is not None)
