"""The trainer's command-line entry points: ``dualrpo train`` (``train``), ``dualrpo sft`` (``sft``,
``sft_config``), ``dualrpo demo`` (``demo``, with ``demo_rl`` run under torchrun) and ``dualrpo plot``.
Each is a thin layer over :mod:`dualrpo_mcore.trainer` (the RL loop) and :mod:`dualrpo_mcore.actor`."""
