"""The DualRPO training loop: actor, rollout orchestration, checkpoints, metrics.

Nothing heavy is imported here (Megatron, transformers load on first use). Actor side:

* ``config``      ``ActorConfig`` tree (model source, parallel, optim, micro, loss, kl, bad steps)
* ``actor``       ``Actor``: ``compute_token_stats``, ``compute_ref_logprobs``, ``update``, ``sft_step``
* ``schedule``    warm-up (``ceil(5%)`` of updates) then constant learning rate
* ``microbatch``  token-balanced micro-batch partition; ``batching`` slices rows and their images
* ``badsteps``    poisoned-step guard (skip, count, ``PoisonedStepError``)
* ``megatron_setup`` model build/load, DDP + (distributed) optimizer, offloadable reference policy
* ``sft_cli``     ``dualrpo sft``: supervised warm start, saved as a Hugging Face directory
"""
