"""Learning-rate schedule of the paper: linear warm-up over the first ``warmup_fraction`` of the
updates, then constant.

Step ``s`` (0-based index of the optimizer update about to be taken) gets
``lr * (s + 1) / W`` for ``s < W`` and ``lr`` afterwards, with ``W = ceil(warmup_fraction * total)``.
The first update therefore uses ``lr / W`` rather than 0: an update at lr 0 would spend a whole
rollout batch on nothing. ``W = 0`` (fraction 0) means constant from the first update.
"""
from __future__ import annotations

import math


def warmup_steps(total_steps: int, warmup_fraction: float) -> int:
    """Number of warm-up updates, ``ceil(warmup_fraction * total_steps)``."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0.0 <= warmup_fraction < 1.0:
        raise ValueError(f"warmup_fraction must lie in [0, 1), got {warmup_fraction}")
    # round() first so that e.g. 0.05 * 100 = 5.000000000000001 does not become 6.
    return math.ceil(round(warmup_fraction * total_steps, 9))


def lr_factor(step: int, total_steps: int, warmup_fraction: float) -> float:
    """Multiplier of the peak learning rate for update ``step`` (0-based)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    w = warmup_steps(total_steps, warmup_fraction)
    return (step + 1) / w if step < w else 1.0


def lr_at(step: int, lr: float, total_steps: int, warmup_fraction: float) -> float:
    """Learning rate of update ``step``: ``lr * lr_factor(...)``."""
    return lr * lr_factor(step, total_steps, warmup_fraction)
