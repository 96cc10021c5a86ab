"""What V-Triune's two verifiers share: the reward weighting and the ``<answer>`` block.

What the ``vtriune`` profile reproduces (their server, commit, licence), the weighting formula and
where the two still differ: docs/vtriune.md.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Tuple

DEFAULT_ACCURACY_RATIO = 1.0
DEFAULT_FORMAT_RATIO = 0.1
RATIO_PARAMS = ("accuracy_ratio", "format_ratio")


class WholeRewardZero(Exception):
    """Their handler catches every exception and answers 0 for the sample, format included; a
    scorer raises this where their code would have raised."""


def _ratio(params: Mapping[str, Any], key: str, default: float) -> float:
    val = params.get(key)
    if val is None:
        return default
    if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val) or val < 0:
        raise ValueError(f"params.{key} must be a finite number >= 0, got {val!r}")
    return float(val)


def ratios(params: Mapping[str, Any]) -> Tuple[float, float]:
    """``(accuracy_ratio, format_ratio)`` with their defaults; raises ValueError naming the field.

    Negative ratios (which their handler would turn into rewards outside [0, 1]) and a zero sum
    (a ZeroDivisionError there, reward 0) are refused when the row is loaded."""
    ar = _ratio(params, "accuracy_ratio", DEFAULT_ACCURACY_RATIO)
    fr = _ratio(params, "format_ratio", DEFAULT_FORMAT_RATIO)
    if not ar + fr > 0:
        raise ValueError("params.accuracy_ratio + params.format_ratio must be > 0")
    return ar, fr


def combine(accuracy: float, fmt: float, params: Mapping[str, Any]) -> float:
    ar, fr = ratios(params)
    total = ar + fr
    return accuracy * (ar / total) + fmt * (fr / total)


def answer_block(text: str) -> str:
    """The first ``<answer>...</answer>`` of the stripped text, stripped; "" when there is none."""
    # their re.search(r"<answer>(.*?)</answer>", re.S): the first opening tag, the first closing
    # tag after it; when that one has none, no later opening tag has one either
    s = text.strip()
    i = s.find("<answer>")
    j = s.find("</answer>", i + 8) if i >= 0 else -1
    return s[i + 8:j].strip() if j >= 0 else ""
