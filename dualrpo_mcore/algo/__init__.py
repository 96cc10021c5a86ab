"""The DualRPO equations (docs/design.md section 1), pure torch: no process groups, no distributed state.

* ``certainty``  self-certainty u (eq. 1), per token and per sequence; masked means.
* ``rewards``    reward modes grpo / dualrpo / internal (eq. 2), registry ``REWARD_MODES``.
* ``advantages`` group advantages grpo / drgrpo / rloo (eq. 3), registry ``ADVANTAGE_ESTIMATORS``.
* ``normalize``  u -> c in [0, 1] for the KL weight, registry ``CERTAINTY_NORMALIZERS``.
* ``kl``         beta(c) (eq. 4) and per-token KL estimators k1/k2/k3/k3_clamped, ``KL_ESTIMATORS``.
* ``loss``       clipped surrogate + KL policy loss (eq. 5), aggregations ``LOSS_AGGREGATIONS``.

Every variant is chosen by name through a :class:`dualrpo_mcore.registry.Registry`.
"""
from .advantages import ADVANTAGE_ESTIMATORS, broadcast_to_tokens, group_advantages
from .certainty import masked_mean, masked_sum, self_certainty, token_self_certainty
from .kl import KL_ESTIMATORS, kl_coefficient, kl_k1, kl_k2, kl_k3, kl_k3_clamped, kl_penalty
from .loss import LOSS_AGGREGATIONS, PolicyLossConfig, aggregate, aggregation_count, policy_loss
from .normalize import (CERTAINTY_NORMALIZERS, DEFAULT_NORMALIZER, BatchMinMaxNormalizer, CertaintyNormalizer,
                        RunningNormalizer, make_normalizer)
from .rewards import REWARD_MODES, shape_rewards

__all__ = [
    "self_certainty", "token_self_certainty", "masked_mean", "masked_sum",
    "shape_rewards", "REWARD_MODES",
    "group_advantages", "broadcast_to_tokens", "ADVANTAGE_ESTIMATORS",
    "kl_coefficient", "kl_penalty", "kl_k1", "kl_k2", "kl_k3", "kl_k3_clamped", "KL_ESTIMATORS",
    "CertaintyNormalizer", "BatchMinMaxNormalizer", "RunningNormalizer", "make_normalizer",
    "CERTAINTY_NORMALIZERS", "DEFAULT_NORMALIZER",
    "policy_loss", "PolicyLossConfig", "aggregate", "aggregation_count", "LOSS_AGGREGATIONS",
]
