"""The DualRPO training loop: actor, rollout orchestration, checkpoints, metrics."""
