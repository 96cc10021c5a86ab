"""KL penalty pieces: the per-token estimators of KL(pi || pi_ref) in ``KL_ESTIMATORS``, (5c) of
docs/design.md with ``d = ref_logp - logp``, and the certainty-modulated weight ``kl_coefficient``,
equation (4).

``k1`` is unbiased but high-variance and can be negative; ``k2`` is biased, low-variance, >= 0.
``k3_clamped`` clamps d, not the value, because exp(d) overflows float32 at d ~ 88 and clamping the
already-infinite value would give ``0 * inf = NaN`` in backward: with d clamped the value is at most
e^10 - 11 ~ 2.2e4, and tokens beyond the range get zero gradient from the KL term, as a PPO clip does.
Plain ``k3`` stays unclamped so that it is eq. 5 verbatim.
"""
from __future__ import annotations

from typing import Callable, Tuple, Union

import torch
from torch import Tensor

from dualrpo_mcore.registry import Registry

__all__ = ["KL_ESTIMATORS", "kl_k1", "kl_k2", "kl_k3", "kl_k3_clamped", "kl_penalty", "kl_coefficient"]

KLFn = Callable[..., Tensor]
KL_ESTIMATORS: Registry[KLFn] = Registry("kl_estimator")


def _log_ratio(logp: Tensor, ref_logp: Tensor) -> Tensor:
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and ref_logp {tuple(ref_logp.shape)} must match")
    return ref_logp - logp


@KL_ESTIMATORS.register("k1")
def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = logp - ref_logp."""
    return -_log_ratio(logp, ref_logp)


@KL_ESTIMATORS.register("k2")
def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 = (ref_logp - logp)**2 / 2."""
    return 0.5 * _log_ratio(logp, ref_logp).square()


@KL_ESTIMATORS.register("k3")
def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1 (docs/design.md eq. 5)."""
    d = _log_ratio(logp, ref_logp)
    return torch.expm1(d) - d


@KL_ESTIMATORS.register("k3_clamped")
def kl_k3_clamped(logp: Tensor, ref_logp: Tensor, clamp: Tuple[float, float] = (-10.0, 10.0)) -> Tensor:
    """k3 with the log-ratio ``ref_logp - logp`` clamped to ``clamp = (lo, hi)`` first."""
    lo, hi = clamp
    if not lo < hi:
        raise ValueError(f"k3_clamped needs clamp = (lo, hi) with lo < hi, got {clamp}")
    d = _log_ratio(logp, ref_logp).clamp(lo, hi)
    return torch.expm1(d) - d


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str = "k3", **options) -> Tensor:
    """Per-token KL estimate by registry name; ``options`` go to the estimator (e.g. ``clamp``)."""
    return KL_ESTIMATORS.get(estimator)(logp, ref_logp, **options)


def kl_coefficient(c: Union[Tensor, float], beta0: float, beta_min: float = 0.05) -> Tensor:
    """Certainty-modulated KL weight, eq. 4, elementwise on ``c`` (values in [0, 1]): a float tensor
    of ``c``'s shape in ``[beta0 * beta_min, beta0]``, decreasing in c."""
    if not beta0 >= 0:
        raise ValueError(f"beta0 must be >= 0, got {beta0}")
    if not 0.0 <= beta_min <= 1.0:
        raise ValueError(f"beta_min must lie in [0, 1], got {beta_min}")
    c = torch.as_tensor(c)
    if not c.is_floating_point():
        c = c.to(torch.float32)
    bad = ~((c >= 0) & (c <= 1))  # also catches NaN
    if bad.any():
        i = int(bad.reshape(-1).nonzero()[0].item())
        raise ValueError(f"normalised certainty c must lie in [0, 1]; c[{i}] = {c.reshape(-1)[i].item()}")
    return beta0 * (beta_min + (1.0 - beta_min) * (1.0 - c))
