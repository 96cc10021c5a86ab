"""The one rule for reducing a metric over parts (micro-batches, updates, ranks).

A key ending in ``_max`` / ``_min`` is an extreme and reduces by max / min; every other key is a mean,
weighted when the parts have weights (their response tokens). Callers add their own exceptions
(sums of losses that are already over the global count, state read after the last part) before this.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def reduce_metric(key: str, values: Sequence[float], weights: Optional[Sequence[float]] = None) -> float:
    """``values`` of ``key`` from several parts, reduced by the key's rule (float64 throughout)."""
    if not len(values):
        raise ValueError(f"reduce_metric: no values for {key!r}")
    vals = torch.as_tensor([float(v) for v in values], dtype=torch.float64)
    if key.endswith("_max"):
        return float(vals.max())
    if key.endswith("_min"):
        return float(vals.min())
    if weights is None:
        return float(vals.mean())
    w = torch.as_tensor([float(x) for x in weights], dtype=torch.float64)
    return float((vals * w).sum() / w.sum().clamp(min=1))
