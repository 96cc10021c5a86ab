"""``dualrpo train --set KEY=VALUE``: values parsed by the field's type, checks re-run on the path,
errors that name the key; and through the CLI parser into the built config."""
import argparse

import pytest

from dualrpo_mcore.trainer.overrides import apply_overrides


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    from dualrpo_mcore.cli import main

    out = tmp_path_factory.mktemp("synth")
    assert main(["data", "synth", "--out", str(out), "--num-per-task", "1", "--heldout-per-task", "1"]) == 0
    return str(out)


@pytest.fixture
def cfg(synth_dir, tmp_path):
    from dualrpo_mcore.trainer.recipes import tiny_cpu

    return tiny_cpu(synth_dir, None, str(tmp_path / "run"), steps=10)


def test_values_take_the_fields_types_and_derived_fields_follow(cfg):
    apply_overrides(cfg, ["schedule.mini_batches=2", "schedule.epochs=3", "schedule.dynamic_sampling=true",
                          "reward.lam=0.25", "verifier.timeout_s=7", "checkpoint.dir=/tmp/ck",
                          "eval.greedy=False"])
    assert cfg.schedule.mini_batches == 2 and cfg.schedule.epochs == 3
    assert cfg.schedule.dynamic_sampling is True and cfg.eval.greedy is False
    assert cfg.reward.lam == 0.25 and isinstance(cfg.verifier.timeout_s, float) and cfg.verifier.timeout_s == 7.0
    assert cfg.checkpoint.dir == "/tmp/ck"
    apply_overrides(cfg, ["checkpoint.dir=none", "logging.run_dir=none"])
    assert cfg.checkpoint.dir is None and cfg.logging.run_dir == "none"  # only an Optional field takes None
    # The root's check derives the warm-up length from the updates: 10 steps x 2 x 3.
    assert cfg.actor.optim.total_steps == 60


@pytest.mark.parametrize("item,message", [
    ("schedule.minibatches=2", "schedule has no field 'minibatches'.*mini_batches"),
    ("nope.x=1", "the config has no field 'nope'"),
    ("schedule.mini_batches=two", "schedule.mini_batches: 'two' is not a int"),
    ("schedule.dynamic_sampling=maybe", "not a boolean"),
    ("schedule=3", "a section, not a value"),
    ("schedule.mini_batches", "expected KEY=VALUE"),
    ("schedule.mini_batches=0", r"schedule.mini_batches must be >= 1"),
    ("rollout.sampling.temperature=0.7", "actor.temperature=1.0 must equal rollout.sampling.temperature=0.7"),
])
def test_bad_overrides_name_the_key(cfg, item, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(cfg, [item])


def test_train_cli_applies_repeated_set(synth_dir, tmp_path):
    from dualrpo_mcore.trainer import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--data", synth_dir, "--out", str(tmp_path / "r"), "--steps", "4",
                              "--set", "schedule.mini_batches=2", "--set", "reward.mode=grpo"])
    cfg = cli.config_from_args(args)
    assert cfg.schedule.mini_batches == 2 and cfg.reward.mode == "grpo" and cfg.actor.optim.total_steps == 8


def test_demo_rl_set_comes_after_its_flags_and_bad_keys_are_named(synth_dir, tmp_path):
    from dualrpo_mcore.trainer import demo_rl

    base = ["--data", synth_dir, "--init", synth_dir, "--out", str(tmp_path / "r"), "--hf-out", str(tmp_path / "h"),
            "--steps", "4", "--deadline", "0", "--mini-batches", "2"]
    cfg = demo_rl.build_config(demo_rl.parse_args(base + ["--set", "actor.loss.agg=seq-mean",
                                                          "--set", "schedule.mini_batches=4"]))
    # the flag said 2 and the override 4: the override wins, and the warm-up follows it (4 steps x 4)
    assert cfg.actor.loss.agg == "seq-mean" and cfg.schedule.mini_batches == 4
    assert cfg.actor.optim.total_steps == 16
    with pytest.raises(ValueError, match="the config has no field 'nope'"):
        demo_rl.build_config(demo_rl.parse_args(base + ["--set", "nope.x=1"]))


def test_fp8_switches_reach_the_models_transformer_configs(synth_dir, tmp_path):
    """``--set actor.model.fp8=...`` on the RL config reaches the LM's TransformerConfig, and
    ``fp8_vision`` the ViT's and the merger's (built here without Transformer Engine)."""
    from dualrpo_mcore.models.qwen2_5_vl.model import transformer_configs
    from dualrpo_mcore.trainer import cli
    from dualrpo_mcore.trainer.megatron_setup import model_options, resolve_model_config

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    sets = ["actor.model.spec_backend=auto", "actor.model.precision=bf16", "actor.model.fp8=hybrid",
            "actor.model.fp8_recipe=tensorwise"]
    for vision in (False, True):
        argv = ["--data", synth_dir, "--out", str(tmp_path / f"r{vision}"), "--steps", "2"]
        for item in sets + [f"actor.model.fp8_vision={vision}"]:
            argv += ["--set", item]
        src = cli.config_from_args(parser.parse_args(argv)).actor.model
        lm, vit, merger = transformer_configs(resolve_model_config(src), model_options(src, "te"))
        assert (lm.fp8, lm.fp8_recipe) == ("hybrid", "tensorwise")
        assert vit.fp8 == merger.fp8 == ("hybrid" if vision else None)
        assert src.token_multiple == 16


def test_dr_grpo_divisor_is_the_response_budget_and_follows_overrides(cfg):
    """Dr. GRPO's constant comes from rollout.sampling.max_new_tokens unless set by hand, is re-derived
    when the budget is overridden, and is in the resolved config (config.json)."""
    apply_overrides(cfg, ["actor.loss.agg=seq-mean-token-sum-norm"])
    assert cfg.actor.loss.response_budget == 24 and cfg.actor.loss.token_sum_norm == 24  # tiny_cpu's budget
    apply_overrides(cfg, ["rollout.sampling.max_new_tokens=40"])
    assert cfg.actor.loss.token_sum_norm == 40
    assert cfg.to_dict()["actor"]["loss"]["response_budget"] == 40
    apply_overrides(cfg, ["actor.loss.max_response_length=64"])
    assert cfg.actor.loss.token_sum_norm == 64
    assert cfg.to_dict()["actor"]["loss"]["max_response_length"] == 64
    apply_overrides(cfg, ["actor.loss.max_response_length=none"])
    assert cfg.actor.loss.token_sum_norm == 40
    cfg.actor.loss.check_complete("actor.loss")
    with pytest.raises(ValueError, match="max_response_length must be >= 1"):
        apply_overrides(cfg, ["actor.loss.max_response_length=0"])
