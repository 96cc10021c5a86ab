"""Reward shaping: how the verifier reward v and the self-certainty u become the scalar reward r.
Modes ``grpo``, ``dualrpo``, ``internal`` (``REWARD_MODES``): equations (2) and (6) of docs/design.md.

Inputs are validated eagerly (equal shapes, finite values, v in [0, 1]) because a silently
broadcast or NaN reward corrupts every advantage of its group; rewards are small per-sample
tensors, so the checks cost nothing next to a rollout.
"""
from __future__ import annotations

from typing import Callable, Union

import torch
from torch import Tensor

from dualrpo_mcore.registry import Registry

__all__ = ["REWARD_MODES", "shape_rewards"]

RewardFn = Callable[[Tensor, Tensor, float, float], Tensor]
REWARD_MODES: Registry[RewardFn] = Registry("reward mode")


@REWARD_MODES.register("grpo")
def _grpo_reward(v: Tensor, u: Tensor, mu: float, lam: float) -> Tensor:
    return v.clone()


@REWARD_MODES.register("dualrpo")
def _dualrpo_reward(v: Tensor, u: Tensor, mu: float, lam: float) -> Tensor:
    return v * (1.0 + mu * u) - lam * (1.0 - v) * u


@REWARD_MODES.register("internal")
def _internal_reward(v: Tensor, u: Tensor, mu: float, lam: float) -> Tensor:
    return u.clone()


def _first_bad(bad: Tensor) -> int:
    return int(bad.reshape(-1).nonzero()[0].item())


def _as_float(x: Union[Tensor, float], name: str) -> Tensor:
    t = torch.as_tensor(x)
    if t.is_complex():
        raise TypeError(f"{name} must be a real tensor, got dtype {t.dtype}")
    return t if t.is_floating_point() else t.to(torch.float32)


def shape_rewards(v: Union[Tensor, float], u: Union[Tensor, float], mu: float = 0.01,
                  lam: float = 0.005, mode: str = "dualrpo") -> Tensor:
    """Combine verifier rewards ``v`` and self-certainty ``u`` elementwise into rewards ``r``.

    Args:
        v: verifier rewards in [0, 1], any shape (usually ``[num_samples]``).
        u: self-certainty of the same samples, same shape as ``v`` (>= 0 by construction).
        mu: bonus weight for certainty on correct answers (the paper's 0.01).
        lam: penalty weight for certainty on wrong answers (the paper's 0.005).
        mode: a name in ``REWARD_MODES`` (``grpo``, ``dualrpo``, ``internal``).

    Returns:
        ``r`` with the shape of ``v``, in the promoted floating dtype of ``v`` and ``u``.
    """
    fn = REWARD_MODES.get(mode)
    v, u = _as_float(v, "v"), _as_float(u, "u")
    if v.shape != u.shape:
        raise ValueError(f"v and u must have the same shape, got {tuple(v.shape)} and {tuple(u.shape)}")
    for name, t in (("v", v), ("u", u)):
        bad = ~torch.isfinite(t)
        if bad.any():
            raise ValueError(f"{name} has a non-finite value at flat index {_first_bad(bad)}")
    out_of_range = (v < 0) | (v > 1)
    if out_of_range.any():
        i = _first_bad(out_of_range)
        raise ValueError(f"verifier reward v must lie in [0, 1]; v[{i}] = {v.reshape(-1)[i].item()}")
    dtype = torch.promote_types(v.dtype, u.dtype)
    return fn(v.to(dtype), u.to(device=v.device, dtype=dtype), float(mu), float(lam))
