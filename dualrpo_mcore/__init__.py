"""dualrpo-mcore: DualRPO (certainty-modulated GRPO) for vision-language models on Megatron-Core.

Public entry points (stable, see docs/design.md section 3.1)::

    from dualrpo_mcore.algo import self_certainty, shape_rewards, group_advantages, kl_coefficient
    from dualrpo_mcore.ops import token_stats
    from dualrpo_mcore.verifiers import verify
"""

__version__ = "0.1.0"
