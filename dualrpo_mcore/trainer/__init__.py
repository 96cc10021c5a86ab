"""The DualRPO RL loop and what a run needs around it; the actor lives in :mod:`dualrpo_mcore.actor`
and the commands in :mod:`dualrpo_mcore.commands`. Its modules: docs/design.md §2.3, each with a
docstring saying what it holds.

Nothing heavy is imported here (Megatron, transformers load on first use).
"""
