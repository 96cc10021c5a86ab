"""Group-relative advantages and their broadcast to response tokens: equations (3), (3a) and (3b)
of docs/design.md (the estimators, Bessel's std and why, exact zeros for a flat group, float64).

``rewards`` is ``[num_groups * group_size]`` with each prompt's G responses contiguous; the estimators
in ``ADVANTAGE_ESTIMATORS`` map a ``[num_groups, G]`` view to advantages. ``drgrpo`` drops the std so
that low-variance groups are not up-weighted; ``rloo`` is computed as ``G / (G - 1) * (r_i - mean)``
(one pass, no per-i loop). The result is cast back to the rewards' float dtype.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from dualrpo_mcore.registry import Registry

__all__ = ["ADVANTAGE_ESTIMATORS", "group_advantages", "broadcast_to_tokens"]

AdvantageFn = Callable[..., Tensor]
ADVANTAGE_ESTIMATORS: Registry[AdvantageFn] = Registry("advantage estimator")


@ADVANTAGE_ESTIMATORS.register("grpo")
def _grpo(r: Tensor, *, eps: float, correction: int = 1) -> Tensor:
    """(r - mean) / (std + eps) per row of ``r`` [groups, G]; ``correction`` 1 = unbiased std."""
    if correction not in (0, 1):
        raise ValueError(f"grpo std correction must be 0 (biased) or 1 (unbiased), got {correction}")
    if correction == 1 and r.shape[1] < 2:
        raise ValueError("grpo with the unbiased std needs group_size >= 2 (one response has no spread)")
    centred = r - r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True, correction=correction)
    return centred / (std + eps)


@ADVANTAGE_ESTIMATORS.register("drgrpo")
def _drgrpo(r: Tensor, *, eps: float) -> Tensor:
    """r - mean per row; ``eps`` is unused (no division)."""
    return r - r.mean(dim=1, keepdim=True)


@ADVANTAGE_ESTIMATORS.register("rloo")
def _rloo(r: Tensor, *, eps: float) -> Tensor:
    """r_i - mean_{j != i} r_j per row; ``eps`` is unused (no division)."""
    g = r.shape[1]
    if g < 2:
        raise ValueError("rloo needs group_size >= 2 (the leave-one-out baseline of one response is empty)")
    return (r - r.mean(dim=1, keepdim=True)) * (g / (g - 1))


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-6, estimator: str = "grpo",
                     **options) -> Tensor:
    """Per-sample advantages from per-sample rewards, groups of ``group_size`` contiguous samples.

    Args:
        rewards: ``[num_groups * group_size]`` (1-D), finite.
        group_size: G, responses per prompt.
        eps: added to the std in ``grpo`` (ignored by the std-free estimators).
        estimator: a name in ``ADVANTAGE_ESTIMATORS`` (``grpo``, ``drgrpo``, ``rloo``).
        **options: passed to the estimator (``grpo`` takes ``correction``: 1 unbiased, 0 biased).

    Returns:
        ``[num_groups * group_size]`` advantages, dtype of ``rewards`` (float32 for integer input).
    """
    fn = ADVANTAGE_ESTIMATORS.get(estimator)
    rewards = torch.as_tensor(rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [num_groups * group_size], got shape {tuple(rewards.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    n = rewards.numel()
    if n == 0 or n % group_size != 0:
        raise ValueError(f"{n} rewards cannot be split into groups of {group_size} "
                         f"(need a positive multiple of group_size)")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    bad = ~torch.isfinite(rewards)
    if bad.any():
        i = int(bad.nonzero()[0].item())
        raise ValueError(f"reward {i} (group {i // group_size}) is not finite: {rewards[i].item()}")
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    r = rewards.to(torch.float64).view(-1, group_size)
    adv = fn(r, eps=float(eps), **options)
    flat = (r == r[:, :1]).all(dim=1, keepdim=True)
    adv = torch.where(flat, torch.zeros_like(adv), adv)
    return adv.reshape(-1).to(out_dtype)


def broadcast_to_tokens(adv: Tensor, mask: Tensor) -> Tensor:
    """Spread per-sequence advantages ``[...]`` over tokens ``[..., T]``; exactly 0 where mask is 0."""
    if mask.shape[:-1] != adv.shape:
        raise ValueError(f"advantages {tuple(adv.shape)} do not match mask {tuple(mask.shape)} "
                         f"without its token axis")
    tok = adv.unsqueeze(-1).expand(mask.shape)
    return torch.where(mask.to(torch.bool), tok, torch.zeros((), dtype=adv.dtype, device=adv.device))
