"""Per-module freeze / lr multipliers, and the FP8 switch failing fast without Transformer Engine."""
import pytest
import torch

from dualrpo_mcore.models.qwen2_5_vl.precision import Precision, te_available
from dualrpo_mcore.models.qwen2_5_vl.specs import resolve_backend
from dualrpo_mcore.models.qwen2_5_vl.training import (ModuleTraining, apply_freeze, param_groups, part_of)


class _Fake(torch.nn.Module):
    """Same parameter naming as QwenVLModel (the real model's names are checked in the distributed test)."""

    def __init__(self):
        super().__init__()
        self.vision = torch.nn.Module()
        self.vision.patch_embed = torch.nn.Linear(4, 4)
        self.vision.merger = torch.nn.Linear(4, 4)
        self.language_model = torch.nn.Linear(4, 4)


def test_parts_by_name():
    assert part_of("vision.layers.0.mlp.linear_fc1.weight") == "vision"
    assert part_of("module.vision.merger.mlp.linear_fc1.bias") == "merger"
    assert part_of("language_model.output_layer.weight") == "language"
    with pytest.raises(ValueError, match="none of"):
        part_of("something.else")


def test_freeze_and_groups():
    m = _Fake()
    t = ModuleTraining(freeze_vision=True, lr_mult_merger=10.0, lr_mult_language=0.5)
    counts = apply_freeze(m, t)
    assert counts == {"vision": 0, "merger": 20, "language": 20}
    groups = {g["name"]: g for g in param_groups(m, t, lr=1e-6, weight_decay=0.1)}
    assert set(groups) == {"merger", "merger.no_decay", "language", "language.no_decay"}
    assert groups["merger"]["lr"] == pytest.approx(1e-5) and groups["merger"]["lr_mult"] == 10.0
    assert groups["language.no_decay"]["weight_decay"] == 0.0 and groups["language"]["weight_decay"] == 0.1
    torch.optim.AdamW(param_groups(m, t, lr=1e-6))  # accepted by a stock optimizer


def test_bad_training_choices():
    with pytest.raises(ValueError, match="lr_mult_vision"):
        ModuleTraining(lr_mult_vision=0.0)
    with pytest.raises(ValueError, match="nothing would train"):
        ModuleTraining(freeze_vision=True, freeze_merger=True, freeze_language=True)


def test_megatron_optimizer_overrides_scale_lr():
    from dualrpo_mcore.models.qwen2_5_vl.training import megatron_overrides

    over = megatron_overrides(ModuleTraining(lr_mult_vision=0.1), lr=1e-6, min_lr=1e-7)
    (key, value), = over.items()
    assert value == {"max_lr": pytest.approx(1e-7), "min_lr": pytest.approx(1e-8)}
    assert key.matches(torch.nn.Parameter(torch.zeros(1)), "vision.layers.0.x")
    assert not key.matches(torch.nn.Parameter(torch.zeros(1)), "vision.merger.x")


@pytest.mark.skipif(te_available(), reason="Transformer Engine is installed here; the no-TE error path cannot occur")
def test_fp8_without_te_fails_at_start_naming_the_extra():
    with pytest.raises(RuntimeError, match=r"pip install dualrpo-mcore\[te\]"):
        Precision(dtype="bf16", fp8="hybrid").check_runtime()
    with pytest.raises(RuntimeError, match=r"pip install dualrpo-mcore\[te\]"):
        resolve_backend("auto", needs_te=True)
    with pytest.raises(ValueError, match="FP8 needs the Transformer Engine spec"):
        resolve_backend("local", needs_te=True)
    assert resolve_backend("auto") == "local"
