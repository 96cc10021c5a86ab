"""Typed configuration of ``dualrpo sft``: the supervised warm start on the Megatron actor.

Built from these defaults plus ``--set KEY=VALUE`` (:func:`~.overrides.apply_overrides` on the class);
the command's flags (``--lr``, ``--tp``, ...) are aliases of ``--set`` entries (:data:`FLAGS`). The
optimizer, micro-batching and parallel sections are the RL actor's own classes, so a setting means the
same in ``dualrpo train --set actor.optim.lr=...`` and ``dualrpo sft --set optim.lr=...``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from dualrpo_mcore.actor.config import ActorConfig, MicroBatchConfig, ModelSourceConfig, OptimConfig, ParallelConfig
from dualrpo_mcore.trainer.rl_config import at_least


class SFTOptimConfig(OptimConfig):
    """:class:`OptimConfig` at the root of the SFT tree (its errors name ``optim.*``)."""

    path = "optim"


class SFTMicroBatchConfig(MicroBatchConfig):
    """:class:`MicroBatchConfig` at the root of the SFT tree (its errors name ``micro.*``)."""

    path = "micro"


class SFTParallelConfig(ParallelConfig):
    """:class:`ParallelConfig` at the root of the SFT tree (its errors name ``parallel.*``)."""

    path = "parallel"


@dataclass
class TinyModelConfig:
    """Shape of the fresh tiny Qwen2.5-VL trained when no ``init`` is given (vocabulary and patch
    geometry come from the data directory's tokenizer and processor)."""

    hidden_size: int = 64
    """LM hidden size."""
    layers: int = 2
    """LM layers."""
    vision_depth: int = 2
    """ViT blocks."""
    vision_hidden: int = 32
    """ViT width (heads of 16 dims)."""

    def __post_init__(self) -> None:
        at_least(self, "tiny.", **{f.name: 1 for f in dataclasses.fields(self)})


@dataclass
class SFTConfig:
    """The whole ``dualrpo sft`` run."""

    data: Optional[str] = None
    """Directory of ``dualrpo data synth`` (the training file + ``model/`` with tokenizer and processor); required."""
    out: Optional[str] = None
    """Output Hugging Face directory; required, and must not exist yet."""
    train_file: str = "train.parquet"
    """File under ``data`` to train on (its ``solution`` column is the target)."""
    init: Optional[str] = None
    """Start from this HF directory instead of a fresh tiny model (``tiny``)."""
    steps: int = 60
    """Optimizer updates (``optim.total_steps`` is derived from it)."""
    batch_size: int = 8
    """Rows per update per data-parallel rank."""
    optim: OptimConfig = field(default_factory=lambda: SFTOptimConfig(lr=2e-3, grad_clip=1.0, decay_fraction=0.1))
    """Optimizer: 5% warm-up, constant, then a linear decay over the last ``decay_fraction`` (0.1:
    ending at the constant peak leaves the warm start at a noisy point, see ``actor/schedule.py``)."""
    micro: MicroBatchConfig = field(default_factory=lambda: SFTMicroBatchConfig(max_tokens=4096))
    """Tokens per micro-batch."""
    parallel: ParallelConfig = field(default_factory=SFTParallelConfig)
    """TP/PP sizes (the rest of the world is data parallel)."""
    seed: int = 0
    """Seed of the fresh model's initialisation, the data order and the actor."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    """Shape of the fresh tiny model (unused with ``init``)."""
    progress: bool = True
    """Show a progress bar (rank 0)."""
    packing: bool = True
    """Packed (padding-free) micro-batches: the actor's ``actor.model.packing`` (its docstring says when
    to turn it off)."""

    def __post_init__(self) -> None:
        for name, flag in (("data", "--data DIR"), ("out", "--out DIR")):
            if not getattr(self, name):
                raise ValueError(f"{name} is required: give {flag} (or --set {name}=DIR)")
        at_least(self, "", steps=1, batch_size=1)
        if self.optim.total_steps is not None and self.optim.total_steps != self.steps:
            raise ValueError(f"optim.total_steps={self.optim.total_steps} conflicts with steps={self.steps}: it is "
                             f"derived from steps; leave optim.total_steps unset and set steps")

    def actor_config(self, hf_config: Any) -> ActorConfig:
        """The actor's config for the tiny-architecture ``hf_config``: these sections, with the optimizer's
        length derived from ``steps``."""
        return ActorConfig(model=ModelSourceConfig(tiny=True, hf_config=hf_config, packing=self.packing),
                           parallel=self.parallel,
                           optim=dataclasses.replace(self.optim, total_steps=self.steps), micro=self.micro,
                           # Cross-entropy on the plain softmax: the probe log-probs match an HF forward.
                           temperature=1.0, seed=self.seed)


# ``dualrpo sft`` flag -> (dotted path, help); ``--no-progress`` is the switch ``progress=false``.
FLAGS = {
    "--data": ("data", "directory of `dualrpo data synth` (train.parquet + model/)"),
    "--out": ("out", "output Hugging Face directory (must not exist)"),
    "--train-file": ("train_file", "file under --data to train on"),
    "--init": ("init", "start from this HF directory instead of a fresh tiny model"),
    "--steps": ("steps", "optimizer updates"),
    "--batch-size": ("batch_size", "rows per update per data-parallel rank"),
    "--lr": ("optim.lr", "peak learning rate (warm-up 5%%, constant, then --decay-fraction linear decay)"),
    "--decay-fraction": ("optim.decay_fraction", "last fraction of the updates over which the rate falls "
                                                 "linearly towards 0"),
    "--max-tokens": ("micro.max_tokens", "tokens per micro-batch"),
    "--tp": ("parallel.tp", "tensor-parallel size"),
    "--pp": ("parallel.pp", "pipeline-parallel size"),
    "--seed": ("seed", "seed of the fresh model, the data order and the actor"),
    "--hidden-size": ("tiny.hidden_size", "tiny model: LM hidden size"),
    "--layers": ("tiny.layers", "tiny model: LM layers"),
    "--vision-depth": ("tiny.vision_depth", "tiny model: ViT blocks"),
    "--vision-hidden": ("tiny.vision_hidden", "tiny model: ViT width (heads of 16 dims)"),
}
