"""Recipes: Python functions returning the root :class:`~.rl_config.RLConfig`, registered by name
with the :class:`Layout` they were sized for (docs/design.md §3.7).

``dualrpo train --recipe NAME`` builds the recipe from the command line's data, init and run dirs,
then applies its ``--set`` overrides to the returned tree: a recipe takes no per-setting arguments.
The layout is what the config's parallel section is built from and what the launcher reads without
building the config.
"""
from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

from dualrpo_mcore.data import DataConfig, SourceConfig
from dualrpo_mcore.registry import Registry
from dualrpo_mcore.rollout.engine import SamplingParams

from dualrpo_mcore.actor.config import ActorConfig, MicroBatchConfig, ModelSourceConfig, OptimConfig, ParallelConfig
from .overrides import alias_items, apply_overrides
from .rl_config import (CheckpointConfig, EvalConfig, LoggingConfig, RewardConfig, RLConfig, RolloutConfig,
                        ScheduleConfig, VerifierConfig)

RECIPES: Registry = Registry("recipe")

SETTINGS = {
    "steps": "schedule.steps", "reward_mode": "reward.mode", "tp": "actor.parallel.tp", "pp": "actor.parallel.pp",
    "group_size": "rollout.group_size", "prompts_per_step": "schedule.prompts_per_step",
    "max_new_tokens": "rollout.sampling.max_new_tokens", "lr": "actor.optim.lr", "resume": "checkpoint.resume",
    "progress": "logging.progress", "packing": "actor.model.packing",
}
"""Short names of often-set fields -> their dotted paths: ``build_recipe``'s keyword arguments and the
``dualrpo train`` flags (``--reward-mode`` is ``--set reward.mode=...``) are these, nothing else."""


@dataclass(frozen=True)
class Layout:
    """The model-parallel split a recipe is sized for, and the machines it was sized on."""

    tp: int = 1
    """Tensor-parallel size of the recipe's actor."""
    pp: int = 1
    """Pipeline-parallel size of the recipe's actor."""
    nodes: int = 1
    """Nodes the launcher asks for by default."""
    gpus_per_node: int = 1
    """Processes (GPUs) per node the launcher starts by default."""

    def __post_init__(self) -> None:
        if min(self.tp, self.pp, self.nodes, self.gpus_per_node) < 1:
            raise ValueError(f"recipe layout {self}: every size must be >= 1")
        if self.world % (self.tp * self.pp):
            raise ValueError(f"recipe layout {self}: {self.world} processes do not split into tp x pp x dp")

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def parallel(self) -> ParallelConfig:
        return ParallelConfig(tp=self.tp, pp=self.pp)


def recipe(name: str, layout: Layout) -> Callable:
    """Register the decorated function in :data:`RECIPES` as ``name``, sized for ``layout`` (``fn.layout``)."""

    def add(fn: Callable[..., RLConfig]) -> Callable[..., RLConfig]:
        fn.layout = layout
        return RECIPES.register(name, fn)

    return add


def recipe_layout(name: str) -> Layout:
    """The :class:`Layout` recipe ``name`` is registered with (an unknown name lists the known ones)."""
    return RECIPES.get(name).layout


def default_world(name: str) -> Tuple[int, int]:
    """``(nodes, gpus_per_node)`` recipe ``name`` is sized for (an unknown name lists the known ones)."""
    layout = recipe_layout(name)
    return layout.nodes, layout.gpus_per_node


def synth_data_config(data_dir: str, file: str, seed: int, shuffle: bool = True) -> DataConfig:
    """A loader config over ``data_dir/file`` whose image sizes match the synthetic set's processor."""
    model_dir = os.path.join(data_dir, "model")
    with open(os.path.join(model_dir, "preprocessor_config.json")) as f:
        size = json.load(f)["size"]
    return DataConfig(sources=[SourceConfig(path=os.path.join(data_dir, file))], seed=seed, shuffle=shuffle,
                      processor_dir=model_dir, min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])


def heldout_eval(data_dir: str, every: int, max_samples: int) -> EvalConfig:
    """Evaluation every ``every`` steps on ``data_dir/heldout.parquet``; off when the file is absent."""
    heldout = os.path.join(data_dir, "heldout.parquet")
    present = os.path.exists(heldout)
    return EvalConfig(every=every if present else 0, heldout=heldout if present else None, max_samples=max_samples)


# The CPU demo's two gloo processes (data parallel at TP=1); one process runs it as well.
@recipe("tiny_cpu", Layout(tp=1, pp=1, nodes=1, gpus_per_node=2))
def tiny_cpu(data_dir: str, init: Optional[str] = None, run_dir: str = "runs/tiny_cpu", *, seed: int = 0) -> RLConfig:
    """The synthetic eight-task set of ``dualrpo data synth`` on a tiny Qwen2.5-VL, on CPU.

    ``init``: the HF directory written by ``dualrpo sft`` (the warm-started tiny policy); None starts
    from a randomly initialised tiny model shaped for the data dir's tokenizer (mechanics only).
    ``seed`` seeds the data order, the sampling and the actor alike."""
    if init:
        model = ModelSourceConfig(hf_dir=init)
    else:
        from dualrpo_mcore.models.qwen2_5_vl.presets import for_tokenizer

        model = ModelSourceConfig(tiny=True, hf_config=for_tokenizer(os.path.join(data_dir, "model")))
    steps = 20
    actor = ActorConfig(model=model, parallel=tiny_cpu.layout.parallel(),
                        # Distributed optimizer off: the tiny model gains nothing from sharding Adam state.
                        optim=OptimConfig(lr=1e-4, warmup_fraction=0.0, distributed_optimizer=False),
                        micro=MicroBatchConfig(max_tokens=4096), seed=seed + 1234)
    return RLConfig(
        actor=actor, data=synth_data_config(data_dir, "train.parquet", seed),
        rollout=RolloutConfig(engine="hf", group_size=4, bucket_mb=16, seed=seed,
                              sampling=SamplingParams(temperature=1.0, max_new_tokens=24)),
        reward=RewardConfig(mode="dualrpo"), verifier=VerifierConfig(workers=2, timeout_s=5.0),
        schedule=ScheduleConfig(steps=steps, prompts_per_step=4),
        checkpoint=CheckpointConfig(every=steps // 4, keep_last=2),
        eval=heldout_eval(data_dir, every=steps // 2, max_samples=16),
        logging=LoggingConfig(run_dir=run_dir))


def build_recipe(name: str, data_dir: str, init: Optional[str], run_dir: str, overrides: Sequence[str] = (),
                 **settings) -> RLConfig:
    """The config of recipe ``name`` (an unknown name lists the known ones), then ``settings`` (the
    short names of :data:`SETTINGS`, e.g. ``steps=4``), then ``overrides`` (``KEY=VALUE``), through
    :func:`~.overrides.apply_overrides`. A keyword the recipe function itself takes (``seed``, a paper
    recipe's ``processor_dir``) goes to it."""
    fn = RECIPES.get(name)
    own = {k for k, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY}
    params = {k: settings.pop(k) for k in list(settings) if k in own}
    cfg = fn(data_dir, init, run_dir, **params)
    return apply_overrides(cfg, [*alias_items(SETTINGS, settings), *overrides])


# Registers the paper-scale recipes (qwen2_5_vl_7b_paper, ..._grpo, qwen2_5_vl_32b) in RECIPES.
from . import recipes_paper  # noqa: E402,F401
