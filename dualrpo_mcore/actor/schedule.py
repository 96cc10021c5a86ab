"""Learning-rate schedule of the paper (docs/design.md section 3.7): linear warm-up over ``W`` updates,
then constant; optionally a linear decay over the last ``decay_fraction`` (off by default).

Update ``s`` (0-based) gets ``lr * (s + 1) / W`` for ``s < W``: the first uses ``lr / W`` rather than 0
because an update at lr 0 would spend a whole rollout batch on nothing. ``W = 0`` means constant.

With ``D = ceil(decay_fraction * total) > 0`` the last ``D`` updates get ``lr * k / (D + 1)``, ``k`` the
number of updates left counting this one (``D, D-1, ..., 1``), and updates past the planned end keep
the smallest of them; where the two ramps overlap (a very short run) the lower one applies.

The RL runs keep the paper's constant rate (D = 0). ``dualrpo sft`` decays: a warm start taken at a
constant 2e-3 sits at a noisy point of its trajectory, and 200 more updates at 2e-4 raised the demo's
held-out mean from 21.1% to 25.2% (``benchmarks/results/demo_rl_sweep_cpu.md``). RL measured against
such a start would be credited with that annealing.
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


def decay_steps(total_steps: int, decay_fraction: float) -> int:
    """Number of decay updates at the end, ``ceil(decay_fraction * total_steps)``."""
    if not 0.0 <= decay_fraction < 1.0:
        raise ValueError(f"decay_fraction must lie in [0, 1), got {decay_fraction}")
    return math.ceil(round(decay_fraction * total_steps, 9))


def lr_factor(step: int, total_steps: int, warmup_fraction: float, decay_fraction: float = 0.0) -> float:
    """Multiplier of the peak learning rate for update ``step`` (0-based)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    w, d = warmup_steps(total_steps, warmup_fraction), decay_steps(total_steps, decay_fraction)
    up = (step + 1) / w if step < w else 1.0
    left = total_steps - step
    down = max(left, 1) / (d + 1) if d and left <= d else 1.0
    return min(up, down)  # in a run too short for both, the lower ramp wins


def lr_at(step: int, lr: float, total_steps: int, warmup_fraction: float, decay_fraction: float = 0.0) -> float:
    """Learning rate of update ``step``: ``lr * lr_factor(...)``."""
    return lr * lr_factor(step, total_steps, warmup_fraction, decay_fraction)
