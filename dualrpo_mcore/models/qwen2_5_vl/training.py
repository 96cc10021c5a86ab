"""Per-module freezing and learning-rate multipliers for the ViT, the merger and the LM.

V-Triune trains the three parts with separate rates (and often freezes the ViT). The choice is a
small dataclass; it is applied by setting ``requires_grad`` and by Megatron-Core's optimizer
``config_overrides`` (one ``ParamKey`` per part, scaling ``max_lr``/``min_lr``), or as plain torch
param groups carrying ``lr_mult`` for other optimizers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Dict, List, Tuple

import torch

PARTS = ("vision", "merger", "language")


def part_of(name: str) -> str:
    """Which part a parameter belongs to, from its module name (wrappers' prefixes ignored)."""
    dotted = "." + name
    if ".vision.merger." in dotted:
        return "merger"
    if ".vision." in dotted:
        return "vision"
    if ".language_model." in dotted:
        return "language"
    raise ValueError(f"parameter {name!r} is in none of {PARTS}")


@dataclass
class ModuleTraining:
    """Which parts train, and at what multiple of the base learning rate."""

    freeze_vision: bool = False
    """Keep the ViT (patch embedding + blocks) fixed."""
    freeze_merger: bool = False
    """Keep the patch merger fixed."""
    freeze_language: bool = False
    """Keep the language model fixed (embedding, decoder, head)."""
    lr_mult_vision: float = 1.0
    """ViT learning rate = base lr x this."""
    lr_mult_merger: float = 1.0
    """Merger learning rate = base lr x this."""
    lr_mult_language: float = 1.0
    """LM learning rate = base lr x this."""

    path: ClassVar[str] = "actor.model.training"
    """Where the trainer's config tree holds it: errors name the dotted path a user would ``--set``."""

    def __post_init__(self) -> None:
        for part in PARTS:
            mult = getattr(self, f"lr_mult_{part}")
            if not mult > 0:
                raise ValueError(f"{self.path}.lr_mult_{part}={mult}: must be > 0 (freeze it instead)")
        if all(getattr(self, f"freeze_{p}") for p in PARTS):
            raise ValueError(f"{self.path} freezes every part: nothing would train")

    def frozen(self, part: str) -> bool:
        return getattr(self, f"freeze_{part}")

    def lr_mult(self, part: str) -> float:
        return getattr(self, f"lr_mult_{part}")


def apply_freeze(model: torch.nn.Module, training: ModuleTraining) -> Dict[str, int]:
    """Set ``requires_grad`` per part; returns the number of trainable elements per part."""
    counts = {p: 0 for p in PARTS}
    for name, param in model.named_parameters():
        part = part_of(name)
        param.requires_grad_(not training.frozen(part))
        if param.requires_grad:
            counts[part] += param.numel()
    return counts


def param_groups(model: torch.nn.Module, training: ModuleTraining, lr: float,
                 weight_decay: float = 0.0) -> List[dict]:
    """torch optimizer groups: one per (part, decays?) with ``lr`` scaled and ``lr_mult`` recorded.
    Biases and norm weights (1-D) get no weight decay, as in Megatron."""
    groups: Dict[Tuple[str, bool], List[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        groups.setdefault((part_of(name), param.ndim > 1), []).append(param)
    return [dict(params=ps, name=f"{part}{'' if decay else '.no_decay'}", lr=lr * training.lr_mult(part),
                 lr_mult=training.lr_mult(part), weight_decay=weight_decay if decay else 0.0)
            for (part, decay), ps in sorted(groups.items())]


def megatron_overrides(training: ModuleTraining, lr: float, min_lr: float = 0.0) -> dict:
    """``config_overrides`` for ``megatron.core.optimizer.get_megatron_optimizer``: per part whose
    multiplier is not 1, its ``max_lr``/``min_lr`` scaled (the LR scheduler follows them)."""
    from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate

    out = {}
    for part in PARTS:
        mult = training.lr_mult(part)
        if mult == 1.0:
            continue
        pred = ParamWithNamePredicate(name=f"qwen_vl_{part}", fn=_matcher(part))
        out[ParamKey(with_name_predicate=pred)] = {"max_lr": lr * mult, "min_lr": min_lr * mult}
    return out


def _matcher(part: str):
    return lambda _param, name: part_of(name) == part
