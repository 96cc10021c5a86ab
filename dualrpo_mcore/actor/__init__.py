"""The Megatron actor and its batches; nothing here knows about the RL loop.

Nothing heavy is imported here (Megatron and transformers load on first use):

* ``config``         ``ActorConfig`` tree (model source and options, parallel, optim, micro, loss, kl, bad steps)
* ``model_source``   the one resolver from a model source (HF dir, preset, tiny, Megatron checkpoint) to its HF config
* ``actor``          ``Actor``: ``compute_token_stats``, ``compute_ref_logprobs``, ``update``, ``sft_step``
* ``batching``       the actor batch: collate, rows, groups, data-parallel shares, mini-batches
* ``microbatch``     token-balanced micro-batch partition and FP8 token padding
* ``megatron_setup`` model build/load, DDP + (distributed) optimizer, offloadable reference policy
* ``schedule``, ``badsteps``, ``reduction``  learning-rate schedule, poisoned-step guard, metric reduction
"""
