"""Normalising self-certainty u (>= 0, unbounded) to c in [0, 1] for the KL weight beta(c): (4a) and
(4b) of docs/design.md, which also says why ``running`` is the default.

Every normaliser in ``CERTAINTY_NORMALIZERS`` is an object ``c = norm(u)`` with ``state_dict()`` /
``load_state_dict()`` so a checkpoint resumes it exactly. Beyond that page: a flat batch gets
c = 0.5 under ``batch_minmax`` because no sample is more or less certain than another, so each gets
the midpoint weight rather than an arbitrary extreme. ``running``'s decay 0.9 is a horizon of ~10
steps, its reference means "more / less certain than the policy has recently been", one degenerate,
very confident response (a repetition loop) moves its mean by 1/N of its excess, and the sigmoid
keeps c strictly inside (0, 1) with a smooth slope.

``algo`` never touches process groups, so under data parallelism the caller either gathers u, or
all-reduces the (count, sum, sum of squares) of its local u and calls ``update_moments`` followed by
``normalize`` (same for ``batch_minmax``: gather, or all-reduce min and max).
"""
from __future__ import annotations

import math
from typing import Any, Dict

import torch
from torch import Tensor

from dualrpo_mcore.registry import Registry

__all__ = ["CERTAINTY_NORMALIZERS", "DEFAULT_NORMALIZER", "CertaintyNormalizer", "BatchMinMaxNormalizer",
           "RunningNormalizer", "make_normalizer"]

CERTAINTY_NORMALIZERS: Registry[type] = Registry("certainty normaliser")
DEFAULT_NORMALIZER = "running"


def _check_u(u: Tensor) -> Tensor:
    u = torch.as_tensor(u)
    if not u.is_floating_point():
        u = u.to(torch.float32)
    bad = ~torch.isfinite(u)
    if bad.any():
        i = int(bad.reshape(-1).nonzero()[0].item())
        raise ValueError(f"self-certainty u[{i}] is not finite: {u.reshape(-1)[i].item()}")
    return u


class CertaintyNormalizer:
    """Interface: ``norm(u) -> c`` (same shape, values in [0, 1]) plus checkpoint state."""

    def __call__(self, u: Tensor) -> Tensor:
        raise NotImplementedError

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state:
            raise KeyError(f"{type(self).__name__} has no state, got keys {sorted(state)}")


@CERTAINTY_NORMALIZERS.register("batch_minmax")
class BatchMinMaxNormalizer(CertaintyNormalizer):
    """Per-batch min-max to [0, 1]; an all-equal batch maps to ``flat_value`` (default 0.5)."""

    def __init__(self, flat_value: float = 0.5):
        if not 0.0 <= flat_value <= 1.0:
            raise ValueError(f"flat_value must lie in [0, 1], got {flat_value}")
        self.flat_value = float(flat_value)

    def __call__(self, u: Tensor) -> Tensor:
        u = _check_u(u)
        if u.numel() == 0:
            return u.clone()
        lo, hi = u.min(), u.max()
        span = hi - lo
        if span <= 0:
            return torch.full_like(u, self.flat_value)
        return ((u - lo) / span).clamp(0.0, 1.0)


@CERTAINTY_NORMALIZERS.register("running")
class RunningNormalizer(CertaintyNormalizer):
    """EMA mean/variance of u, then a sigmoid of the z-score (see the module docstring).

    Args:
        decay: EMA weight of the old statistics per update, in [0, 1).
        eps: added to the variance before the square root (a flat history cannot divide by 0).
        temperature: divides the z-score; larger gives a flatter map.
    """

    def __init__(self, decay: float = 0.9, eps: float = 1e-6, temperature: float = 1.0):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {decay}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.decay, self.eps, self.temperature = float(decay), float(eps), float(temperature)
        self.mean, self.var, self.steps = 0.0, 0.0, 0

    def update_moments(self, mean: float, var: float) -> None:
        """Fold in one batch given its mean and population variance (e.g. all-reduced over ranks)."""
        mean, var = float(mean), float(var)
        if not (math.isfinite(mean) and math.isfinite(var) and var >= 0):
            raise ValueError(f"batch moments must be finite with var >= 0, got mean={mean}, var={var}")
        if self.steps == 0:
            self.mean, self.var = mean, var
        else:
            d = self.decay
            shift = mean - self.mean
            self.var = d * self.var + (1 - d) * var + d * (1 - d) * shift * shift
            self.mean = d * self.mean + (1 - d) * mean
        self.steps += 1

    def update(self, u: Tensor) -> None:
        """Fold in the batch ``u`` (no-op for an empty batch)."""
        u = _check_u(u)
        if u.numel() == 0:
            return
        u64 = u.detach().to(torch.float64)
        self.update_moments(u64.mean().item(), u64.var(correction=0).item())

    def normalize(self, u: Tensor) -> Tensor:
        """Map u to (0, 1) with the current statistics, without updating them."""
        u = _check_u(u)
        if self.steps == 0:
            raise RuntimeError("RunningNormalizer.normalize before any update: no statistics yet")
        z = (u.to(torch.float64) - self.mean) / (math.sqrt(self.var + self.eps) * self.temperature)
        return torch.sigmoid(z).to(u.dtype)

    def __call__(self, u: Tensor) -> Tensor:
        self.update(u)
        return self.normalize(u) if u.numel() else _check_u(u).clone()

    def state_dict(self) -> Dict[str, Any]:
        return {"mean": self.mean, "var": self.var, "steps": self.steps}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        missing = {"mean", "var", "steps"} - set(state)
        if missing:
            raise KeyError(f"RunningNormalizer state is missing {sorted(missing)}")
        self.mean, self.var, self.steps = float(state["mean"]), float(state["var"]), int(state["steps"])


def make_normalizer(name: str = DEFAULT_NORMALIZER, **kwargs) -> CertaintyNormalizer:
    """Build a normaliser by registry name, passing ``kwargs`` to its constructor."""
    return CERTAINTY_NORMALIZERS.get(name)(**kwargs)
