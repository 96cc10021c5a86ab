"""Response-length mixes of ``dualrpo bench train`` (``--length-mix``): each row's response length,
drawn with a seeded ``random.Random`` (the same seed gives the same lengths on every rank and run) and
capped at the maximum (``--response-len``), never below 1 token.

* ``fixed``: every row at the maximum (equal rows: no padding; the bench's behaviour before mixes).
* ``demo``: drawn from a histogram of the response lengths of ``dualrpo demo``'s real rollouts,
  ``benchmarks/results/response_lengths_demo.json`` (made by ``benchmarks/probes/response_lengths.py``;
  ``--length-mix-file`` names another). Its lengths are used as recorded, so a maximum below the demo's
  ``max_new_tokens`` (64) truncates the long ones and a larger maximum leaves them as they are.
* ``heavy-tail``: a discretised log-normal, median = max / 8 and sigma = 1 (natural log), clipped to
  [1, max]. A log-normal is the usual fit of LLM output lengths: most responses are short and a long
  tail runs to the generation limit. With these parameters about 2% of the draws exceed the maximum
  and land on it, as truncated responses do in RL runs, and the longest of a batch of 16 is typically
  ~3/4 of the maximum: a padded batch is sized by that row while the median row is 1/8 of the cap.
"""
from __future__ import annotations

import json
import math
import os
import random
from typing import Dict, List, Optional

MIXES = ("fixed", "demo", "heavy-tail")
HEAVY_TAIL_MEDIAN_FRACTION = 1 / 8
HEAVY_TAIL_SIGMA = 1.0


def default_demo_file() -> str:
    """``benchmarks/results/response_lengths_demo.json`` of the checkout this package runs from, else
    of the working directory (an installed package has no ``benchmarks/``)."""
    rel = os.path.join("benchmarks", "results", "response_lengths_demo.json")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", rel)
    return os.path.normpath(path) if os.path.exists(path) else rel


def load_histogram(path: str) -> Dict[int, int]:
    """``{length: count}`` from a JSON file holding ``{"histogram": {"<length>": count, ...}}``."""
    with open(path) as f:
        doc = json.load(f)
    raw = doc.get("histogram") if isinstance(doc, dict) else None
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{path}: expected a non-empty 'histogram' object of length -> count")
    hist = {int(k): int(v) for k, v in raw.items()}
    if any(k < 0 or v < 0 for k, v in hist.items()) or sum(hist.values()) == 0:
        raise ValueError(f"{path}: histogram lengths and counts must be >= 0, with some count > 0")
    return hist


def heavy_tail(rng: random.Random, max_len: int) -> int:
    """One draw of the heavy-tailed mix (see the module docstring), in [1, max_len]."""
    median = max(1.0, max_len * HEAVY_TAIL_MEDIAN_FRACTION)
    x = rng.lognormvariate(math.log(median), HEAVY_TAIL_SIGMA)
    return min(max_len, max(1, round(x)))


def draw_lengths(mix: str, rows: int, max_len: int, seed: int = 0,
                 histogram: Optional[Dict[int, int]] = None) -> List[int]:
    """``rows`` response lengths of ``mix``, each in [1, max_len]; ``histogram`` is needed by ``demo``."""
    if max_len < 1 or rows < 0:
        raise ValueError(f"max_len must be >= 1 and rows >= 0 (got {max_len}, {rows})")
    if mix == "fixed":
        return [max_len] * rows
    rng = random.Random(f"length-mix/{mix}/{seed}")  # a string seed: stable across Python versions
    if mix == "heavy-tail":
        return [heavy_tail(rng, max_len) for _ in range(rows)]
    if mix == "demo":
        if not histogram:
            raise ValueError("the demo mix needs a histogram (load_histogram)")
        lengths = sorted(histogram)
        drawn = rng.choices(lengths, weights=[histogram[k] for k in lengths], k=rows)
        return [min(max_len, max(1, x)) for x in drawn]
    raise ValueError(f"length mix {mix!r}: choose one of {MIXES}")


def describe(lengths: List[int]) -> Dict[str, float]:
    """Min, median, mean, max of drawn lengths (for the report)."""
    s = sorted(lengths)
    n = len(s)
    median = (s[(n - 1) // 2] + s[n // 2]) / 2 if n else 0.0
    return dict(min=s[0] if n else 0, median=median, mean=sum(s) / n if n else 0.0, max=s[-1] if n else 0)
