"""The DualRPO policy loss: equation (5) of docs/design.md with (5a)-(5d) (ratio, clipping, TIS, KL
estimators, aggregations, sign); aggregations and empty rows in full: docs/loss_aggregation.md.

Two reasons beyond that page: the log-ratio clamp (``log_ratio_clamp``, default 20) lies far beyond
any clip range, so it only bites on broken inputs; and with the dual clip a token whose ratio has run
away above c stops pushing.

Metrics (detached 0-dim tensors, token-means over the mask, 0 when the mask is empty; they stay
on device so logging does not force a sync): ``pg_loss``, ``clip_frac_low`` (A < 0 and
ratio < 1 - clip_low), ``clip_frac_high`` (A > 0 and ratio > 1 + clip_high), ``clip_frac`` (their
sum: tokens whose gradient the clip removed), ``dual_clip_frac`` (A < 0 and ratio > c),
``ratio_mean/min/max``, ``approx_kl``; with TIS ``tis_weight_mean`` and ``tis_trunc_frac``; with a
rollout logp ``rollout_logp_absdiff``; with KL ``kl_mean``, ``beta_mean``, ``kl_loss``.
``approx_kl`` is the k3 estimate of KL(pi_old || pi) on tokens sampled from pi_old,
``mean(exp(logp - old) - (logp - old) - 1)``: non-negative and low-variance, unlike the k1 mean
``mean(old - logp)``, which is noisy and can go negative. No entropy term is involved.

Precision: computed in float32 (float64 when ``logp`` is float64); bf16 inputs are upcast.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from dualrpo_mcore.registry import Registry

from .certainty import compute_dtype, masked_mean, masked_sum
from .kl import KL_ESTIMATORS

__all__ = ["LOSS_AGGREGATIONS", "Aggregation", "PolicyLossConfig", "aggregate", "aggregation_count", "policy_loss"]

DR_GRPO = "seq-mean-token-sum-norm"


@dataclass(frozen=True)
class Aggregation:
    """A loss aggregation as ``total(x, mask, L) / count(mask)`` (docs/loss_aggregation.md, "The rule")."""

    total: Callable[[Tensor, Tensor, Optional[int]], Tensor]
    count: Callable[[Tensor], Tensor]


LOSS_AGGREGATIONS: Registry[Aggregation] = Registry("loss aggregation")


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """num / den, and 0 where den == 0 (num is then 0 too: nothing was summed)."""
    return num / torch.where(den > 0, den, torch.ones_like(den))


def _tokens(mask: Tensor) -> Tensor:
    return mask.sum()


def _nonempty_rows(mask: Tensor) -> Tensor:
    return (mask.sum(-1) > 0).to(mask.dtype).sum()


def _token_sum_over_length(x: Tensor, mask: Tensor, length: Optional[int]) -> Tensor:
    if length is None:
        raise ValueError(f"loss aggregation {DR_GRPO!r} (Dr. GRPO) divides every row by a constant of the run: "
                         f"set PolicyLossConfig.max_response_length (or response_budget; an RL run fills it "
                         f"from rollout.sampling.max_new_tokens)")
    return masked_sum(x, mask) / length


LOSS_AGGREGATIONS.register("token-mean", Aggregation(total=lambda x, m, _: masked_sum(x, m), count=_tokens))
LOSS_AGGREGATIONS.register("seq-mean", Aggregation(total=lambda x, m, _: masked_mean(x, m, dim=-1).sum(),
                                                   count=_nonempty_rows))
LOSS_AGGREGATIONS.register(DR_GRPO, Aggregation(total=_token_sum_over_length, count=_nonempty_rows))


def aggregation_count(mask: Tensor, agg: str = "token-mean") -> Tensor:
    """The denominator of ``agg`` over ``mask [..., T]`` (tokens, or non-empty rows), float64 so that
    sums over micro-batches and ranks stay exact; the same rule as :func:`aggregate`'s local count."""
    return LOSS_AGGREGATIONS.get(agg).count(mask.to(torch.float64))


def aggregate(x: Tensor, mask: Tensor, agg: str = "token-mean", *, max_response_length: Optional[int] = None,
              denominator: Union[Tensor, float, None] = None) -> Tensor:
    """Reduce per-token values ``[B, T]`` to a scalar with the named aggregation ((5d) of docs/design.md);
    ``max_response_length`` is Dr. GRPO's constant ``L`` (required by it, unused by the others)."""
    a = LOSS_AGGREGATIONS.get(agg)
    m = mask.to(x.dtype)
    den = a.count(m) if denominator is None else torch.as_tensor(denominator, dtype=x.dtype, device=x.device)
    return _safe_div(a.total(x, m, max_response_length), den)


@dataclass
class PolicyLossConfig:
    """Hyper-parameters of :func:`policy_loss` (docs/design.md eq. 5)."""

    path: ClassVar[str] = "actor.loss"
    """Where the trainer's config tree holds it: errors name the dotted path a user would ``--set``."""

    clip_low: float = 0.2
    """Lower PPO clip: the ratio is clipped at ``1 - clip_low``; in [0, 1)."""
    clip_high: float = 0.2
    """Upper PPO clip (clip-higher when > clip_low): the ratio is clipped at ``1 + clip_high``; >= 0."""
    dual_clip: Optional[float] = None
    """Dual-clip constant c > 1: for A < 0 the per-token loss is capped at ``-A * c``. None = off."""
    agg: str = "token-mean"
    """Aggregation over tokens, a name in ``LOSS_AGGREGATIONS``."""
    max_response_length: Optional[int] = None
    """Dr. GRPO's constant ``L`` (``seq-mean-token-sum-norm`` divides every row's token sum by it), set
    by hand; None = ``response_budget``. One value for every micro-batch, data-parallel rank and layout."""
    response_budget: Optional[int] = None
    """The rollout's response budget in tokens, Dr. GRPO's default ``L``. In an RL run it is derived:
    ``RLConfig.resolved_actor()`` fills it from ``rollout.sampling.max_new_tokens`` (as it does
    ``actor.optim.total_steps``); a caller without the RL config (SFT, benchmarks, tests) sets it or
    ``max_response_length``."""
    kl_estimator: str = "k3"
    """Per-token KL(pi || pi_ref) estimator, a name in ``KL_ESTIMATORS`` (k3 = eq. 5)."""
    kl_options: Dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments of the estimator, e.g. ``{"clamp": (-10, 10)}`` for k3_clamped."""
    tis_cap: Optional[float] = None
    """Truncated importance sampling cap on exp(old - rollout logp); None = off (needs rollout logp)."""
    log_ratio_clamp: float = 20.0
    """|logp - old_logp| is clamped to this before exp, for overflow safety only; > 0."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.clip_low < 1.0:
            raise ValueError(f"{self.path}.clip_low must lie in [0, 1), got {self.clip_low}")
        if not self.clip_high >= 0.0:
            raise ValueError(f"{self.path}.clip_high must be >= 0, got {self.clip_high}")
        if self.dual_clip is not None and not self.dual_clip > 1.0:
            raise ValueError(f"{self.path}.dual_clip must be > 1 (or None), got {self.dual_clip}")
        if self.agg not in LOSS_AGGREGATIONS:
            raise ValueError(f"{self.path}.agg {self.agg!r} unknown; known: {LOSS_AGGREGATIONS.names()}")
        for name in ("max_response_length", "response_budget"):
            if getattr(self, name) is not None and not getattr(self, name) >= 1:
                raise ValueError(f"{self.path}.{name} must be >= 1 (or None), got {getattr(self, name)}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"{self.path}.kl_estimator {self.kl_estimator!r} unknown; "
                             f"known: {KL_ESTIMATORS.names()}")
        if self.tis_cap is not None and not self.tis_cap > 0:
            raise ValueError(f"{self.path}.tis_cap must be > 0 (or None), got {self.tis_cap}")
        if not self.log_ratio_clamp > 0:
            raise ValueError(f"{self.path}.log_ratio_clamp must be > 0, got {self.log_ratio_clamp}")

    @property
    def token_sum_norm(self) -> Optional[int]:
        """Dr. GRPO's ``L``: ``max_response_length`` when set, else ``response_budget``."""
        return self.max_response_length if self.max_response_length is not None else self.response_budget

    def check_complete(self, path: str = "PolicyLossConfig") -> None:
        """Fails, naming the fields, where the aggregation needs a constant that nothing has set.
        Separate from ``__post_init__`` because the RL config fills ``response_budget`` after this
        branch is built; the actor calls it before its first update."""
        if self.agg == DR_GRPO and self.token_sum_norm is None:
            raise ValueError(f"{path}.agg={DR_GRPO!r} (Dr. GRPO) needs its constant divisor: set "
                             f"{path}.max_response_length, or {path}.response_budget (an RL run fills it "
                             f"from rollout.sampling.max_new_tokens)")


def _per_token(x: Union[Tensor, float], shape: torch.Size, name: str, like: Tensor) -> Tensor:
    """Broadcast a scalar, per-sequence ``shape[:-1]`` or per-token ``shape`` value to ``shape``."""
    t = torch.as_tensor(x, device=like.device).detach().to(like.dtype)
    if t.dim() == 0 or t.shape == shape:
        return t.expand(shape)
    if t.shape == shape[:-1]:
        return t.unsqueeze(-1).expand(shape)
    raise ValueError(f"{name} has shape {tuple(t.shape)}; expected a scalar, {tuple(shape[:-1])} "
                     f"(per sequence) or {tuple(shape)} (per token)")


def _clipped_surrogate(ratio: Tensor, adv: Tensor, cfg: PolicyLossConfig) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Per-token ``-min(ratio A, clip(ratio) A)`` (dual-clipped if set) and the clip indicators."""
    lo, hi = 1.0 - cfg.clip_low, 1.0 + cfg.clip_high
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(lo, hi))
    flags = {"clip_frac_high": (adv > 0) & (ratio > hi), "clip_frac_low": (adv < 0) & (ratio < lo)}
    if cfg.dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * cfg.dual_clip), loss)
        flags["dual_clip_frac"] = (adv < 0) & (ratio > cfg.dual_clip)
    else:
        flags["dual_clip_frac"] = torch.zeros_like(flags["clip_frac_low"])
    return loss, flags


def _masked_extreme(x: Tensor, mask: Tensor, fn: Callable[[Tensor], Tensor], fill: float) -> Tensor:
    if x.numel() == 0:
        return x.new_zeros(())
    # where() instead of a Python branch on mask.any(): metrics must not force a device sync.
    extreme = fn(torch.where(mask, x, torch.full_like(x, fill)))
    return torch.where(mask.any(), extreme, x.new_zeros(()))


def _check_inputs(cfg: PolicyLossConfig, logp: Tensor, *, kl_on: bool, **others: Optional[Tensor]) -> None:
    if logp.dim() < 1:
        raise ValueError("logp must be [..., T]")
    for name, t in others.items():
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected logp's shape {tuple(logp.shape)}")
    if (others["ref_logp"] is None) == kl_on:
        raise ValueError("the KL term needs both ref_logp and kl_coef (pass neither to disable it)")
    if cfg.tis_cap is not None and others["rollout_logp"] is None:
        raise ValueError("tis_cap is set but rollout_logp was not given")


def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Union[Tensor, float], mask: Tensor, *,
                ref_logp: Optional[Tensor] = None, kl_coef: Union[Tensor, float, None] = None,
                rollout_logp: Optional[Tensor] = None, denominator: Union[Tensor, float, None] = None,
                config: Optional[PolicyLossConfig] = None, **hparams) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Clipped-surrogate + KL loss to minimise, and its metrics (see the module docstring).

    Args:
        logp: ``[..., T]`` log-probabilities of the sampled tokens under the current policy
            (the only input that carries gradient).
        old_logp: ``[..., T]`` the same under the policy that generated the batch (detached).
        advantages: scalar, ``[...]`` per sequence or ``[..., T]`` per token.
        mask: ``[..., T]``, 1 on response tokens.
        ref_logp, kl_coef: reference-policy logp ``[..., T]`` and beta (scalar, per sequence or
            per token); give both to enable the KL term, or neither.
        rollout_logp: ``[..., T]`` logp reported by the rollout engine; needed when ``tis_cap`` is set.
        denominator: overrides the aggregation's count (tokens or non-empty rows), e.g. the whole
            batch's :func:`aggregation_count` over every micro-batch and rank.
        config: a :class:`PolicyLossConfig`; or pass its fields as keyword arguments (not both).

    Returns:
        ``(loss, metrics)``: a 0-dim tensor and a dict of detached 0-dim tensors.
    """
    if config is not None and hparams:
        raise TypeError(f"pass either config or loss keyword arguments, not both (got {sorted(hparams)})")
    cfg = config if config is not None else PolicyLossConfig(**hparams)
    _check_inputs(cfg, logp, old_logp=old_logp, mask=mask, ref_logp=ref_logp, rollout_logp=rollout_logp,
                  kl_on=kl_coef is not None)
    shape = logp.shape
    dtype = compute_dtype(logp)
    keep = mask.to(torch.bool)
    zero = torch.zeros((), dtype=dtype, device=logp.device)
    # Padding may hold -inf/NaN logps; select before any arithmetic so no NaN reaches the gradient.
    def clean(t: Tensor) -> Tensor:
        return torch.where(keep, t.to(dtype), zero)

    cur, old = clean(logp), clean(old_logp).detach()
    adv = torch.where(keep, _per_token(advantages, shape, "advantages", cur), zero)
    log_ratio = (cur - old).clamp(-cfg.log_ratio_clamp, cfg.log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    pg, flags = _clipped_surrogate(ratio, adv, cfg)
    metrics: Dict[str, Tensor] = {}
    if rollout_logp is not None:
        roll = clean(rollout_logp).detach()
        metrics["rollout_logp_absdiff"] = masked_mean((old - roll).abs(), keep)
        if cfg.tis_cap is not None:
            raw_w = torch.exp(old - roll)
            w = raw_w.clamp(max=cfg.tis_cap)
            pg = pg * w
            metrics["tis_weight_mean"] = masked_mean(w, keep)
            metrics["tis_trunc_frac"] = masked_mean((raw_w > cfg.tis_cap).to(dtype), keep)

    agg = dict(agg=cfg.agg, max_response_length=cfg.token_sum_norm, denominator=denominator)
    loss = aggregate(pg, keep, **agg)
    metrics["pg_loss"] = loss.detach()
    if ref_logp is not None:
        beta = torch.where(keep, _per_token(kl_coef, shape, "kl_coef", cur), zero)
        kl = KL_ESTIMATORS.get(cfg.kl_estimator)(cur, clean(ref_logp).detach(), **cfg.kl_options)
        kl_loss = aggregate(beta * kl, keep, **agg)
        loss = loss + kl_loss
        metrics.update(kl_loss=kl_loss.detach(), kl_mean=masked_mean(kl.detach(), keep),
                       beta_mean=masked_mean(beta, keep))

    with torch.no_grad():
        for name, flag in flags.items():
            metrics[name] = masked_mean(flag.to(dtype), keep)
        metrics["clip_frac"] = metrics["clip_frac_low"] + metrics["clip_frac_high"]
        metrics["ratio_mean"] = masked_mean(ratio, keep)
        metrics["ratio_min"] = _masked_extreme(ratio, keep, torch.min, float("inf"))
        metrics["ratio_max"] = _masked_extreme(ratio, keep, torch.max, float("-inf"))
        metrics["approx_kl"] = masked_mean(torch.expm1(log_ratio) - log_ratio, keep)
    return loss, {k: v.detach() for k, v in metrics.items()}
