"""The DualRPO RL loop and what a run needs around it; the actor lives in :mod:`dualrpo_mcore.actor`
and the commands in :mod:`dualrpo_mcore.commands`.

Nothing heavy is imported here (Megatron, transformers load on first use):

* ``loop``        the algorithm: rollout -> verify -> token stats -> shape -> advantages -> update -> sync
* ``context``     what one rank holds (``Context``), set-up, checkpoint save/resume, ``Hooks``
* ``rollouts``    rollout on the engine's ranks, verification, the actor batch, weight sync
* ``evaluation``  held-out evaluation, written per prompt; ``bootstrap`` paired intervals over it
* ``probe``       the weight-sync probe (the engine must score as the trainer does)
* ``checkpoint``, ``storage``, ``recovery``, ``faults``, ``preempt``  durable state and every way a run ends
* ``metrics``, ``sink_wandb``  records and their sinks (JSONL, TensorBoard, console, W&B)
* ``rl_config``, ``recipes``, ``recipes_paper``, ``overrides``  the typed config, recipes and ``--set``
"""
