"""Recipes: Python functions returning the root :class:`~.rl_config.RLConfig`, chosen by name.

``dualrpo train --recipe NAME`` looks the function up in :data:`RECIPES` and passes the command
line's data dir, init dir and run dir; any further override is applied to the returned tree.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from dualrpo_mcore.data import DataConfig, SourceConfig
from dualrpo_mcore.registry import Registry
from dualrpo_mcore.rollout.engine import SamplingParams

from .config import ActorConfig, MicroBatchConfig, ModelSourceConfig, OptimConfig, ParallelConfig
from .rl_config import (CheckpointConfig, EvalConfig, LoggingConfig, RewardConfig, RLConfig, RolloutConfig,
                        ScheduleConfig, VerifierConfig)

RECIPES: Registry = Registry("recipe")


def _data_config(data_dir: str, file: str, seed: int, shuffle: bool = True) -> DataConfig:
    """A loader config over ``data_dir/file`` whose image sizes match the synthetic set's processor."""
    model_dir = os.path.join(data_dir, "model")
    with open(os.path.join(model_dir, "preprocessor_config.json")) as f:
        size = json.load(f)["size"]
    return DataConfig(sources=[SourceConfig(path=os.path.join(data_dir, file))], seed=seed, shuffle=shuffle,
                      processor_dir=model_dir, min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])


@RECIPES.register("tiny_cpu")
def tiny_cpu(data_dir: str, init: Optional[str] = None, run_dir: str = "runs/tiny_cpu", *, steps: int = 20,
             reward_mode: str = "dualrpo", tp: int = 1, pp: int = 1, group_size: int = 4, prompts_per_step: int = 4,
             max_new_tokens: int = 24, lr: float = 1e-4, seed: int = 0) -> RLConfig:
    """The synthetic eight-task set of ``dualrpo data synth`` on a tiny Qwen2.5-VL, on CPU.

    ``init``: the HF directory written by ``dualrpo sft`` (the warm-started tiny policy); None starts
    from a randomly initialised tiny model shaped for the data dir's tokenizer (mechanics only)."""
    if init:
        model = ModelSourceConfig(hf_dir=init)
    else:
        from .sft_cli import tiny_config_for_tokenizer

        model = ModelSourceConfig(tiny=True, hf_config=tiny_config_for_tokenizer(os.path.join(data_dir, "model")))
    temperature = 1.0
    actor = ActorConfig(model=model, parallel=ParallelConfig(tp=tp, pp=pp),
                        # Distributed optimizer off: the tiny model gains nothing from sharding Adam state.
                        optim=OptimConfig(lr=lr, warmup_fraction=0.0, distributed_optimizer=False),
                        micro=MicroBatchConfig(max_tokens=4096), temperature=temperature, seed=seed + 1234)
    heldout = os.path.join(data_dir, "heldout.parquet")
    return RLConfig(
        actor=actor, data=_data_config(data_dir, "train.parquet", seed),
        rollout=RolloutConfig(engine="hf", group_size=group_size, bucket_mb=16, seed=seed,
                              sampling=SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens)),
        reward=RewardConfig(mode=reward_mode), verifier=VerifierConfig(workers=2, timeout_s=5.0),
        schedule=ScheduleConfig(steps=steps, prompts_per_step=prompts_per_step),
        checkpoint=CheckpointConfig(every=max(1, steps // 4), keep_last=2),
        eval=EvalConfig(every=max(1, steps // 2) if os.path.exists(heldout) else 0,
                        heldout=heldout if os.path.exists(heldout) else None, max_samples=16),
        logging=LoggingConfig(run_dir=run_dir))


def build_recipe(name: str, data_dir: str, init: Optional[str], run_dir: str, **kwargs) -> RLConfig:
    """The config of recipe ``name`` (an unknown name is an error listing the known ones)."""
    return RECIPES.get(name)(data_dir, init, run_dir, **kwargs)


# Registers the paper-scale recipes (qwen2_5_vl_7b_paper, ..._grpo, qwen2_5_vl_32b) in RECIPES.
from . import recipes_paper  # noqa: E402,F401
