"""``dualrpo train --set KEY=VALUE``: values parsed by the field's type, checks re-run on the path,
errors that name the key; and through the CLI parser into the built config."""
import argparse

import pytest

from dualrpo_mcore.trainer.overrides import apply_overrides


@pytest.fixture
def cfg(synth_dir, tmp_path):
    from dualrpo_mcore.trainer.recipes import build_recipe

    return build_recipe("tiny_cpu", synth_dir, None, str(tmp_path / "run"), steps=10)


def _train_config(synth_dir, out, argv):
    from dualrpo_mcore.commands import train as cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return cli.config_from_args(parser.parse_args(["--data", synth_dir, "--out", out, *argv]))


def test_values_take_the_fields_types_and_derived_fields_follow(cfg):
    new = apply_overrides(cfg, ["schedule.mini_batches=2", "schedule.epochs=3", "schedule.dynamic_sampling=true",
                                "reward.lam=0.25", "verifier.timeout_s=7", "checkpoint.dir=/tmp/ck",
                                "eval.greedy=False"])
    assert new.schedule.mini_batches == 2 and new.schedule.epochs == 3
    assert new.schedule.dynamic_sampling is True and new.eval.greedy is False
    assert new.reward.lam == 0.25 and isinstance(new.verifier.timeout_s, float) and new.verifier.timeout_s == 7.0
    assert new.checkpoint.dir == "/tmp/ck"
    # A new tree: the validated input is never edited.
    assert cfg.schedule.mini_batches == 1 and cfg.checkpoint.dir is None
    new = apply_overrides(new, ["checkpoint.dir=none", "logging.run_dir=none", "data.processor_dir=123"])
    assert new.checkpoint.dir is None and new.logging.run_dir == "none"  # only an Optional field takes None
    assert new.data.processor_dir == "123" == new.tokenizer_path  # a path that reads as a number stays a path
    # The warm-up length is derived from the updates (10 steps x 2 x 3), never stored in the tree.
    assert new.actor.optim.total_steps is None and new.resolved_actor().optim.total_steps == 60
    assert new.to_dict()["actor"]["optim"]["total_steps"] == 60


def test_checks_run_once_on_the_final_values(cfg):
    """Two entries that are only valid together: each alone would fail eval's check."""
    new = apply_overrides(cfg, ["eval.every=0", "eval.heldout=none"])
    assert (new.eval.every, new.eval.heldout) == (0, None)
    with pytest.raises(ValueError, match="eval.heldout must name a file when eval.every > 0"):
        apply_overrides(cfg, ["eval.heldout=none"])


@pytest.mark.parametrize("item,message", [
    ("schedule.minibatches=2", "schedule has no field 'minibatches'.*mini_batches"),
    ("nope.x=1", "the config has no field 'nope'"),
    ("schedule.mini_batches=two", "schedule.mini_batches: 'two' is not a int"),
    ("schedule.dynamic_sampling=maybe", "not a boolean"),
    ("schedule.dynamic_sampling_on=v", r"schedule.dynamic_sampling_on='v': the value 'v' was renamed to 'accuracy'"),
    ("schedule=3", "a section, not a value"),
    ("schedule.mini_batches", "expected KEY=VALUE"),
    ("schedule.mini_batches=0", r"schedule.mini_batches must be >= 1"),
    ("actor.temperature=0.5", r"actor.temperature=0.5 conflicts with rollout.sampling.temperature=1.0"),
    ("actor.optim.total_steps=3", r"actor.optim.total_steps=3 conflicts with schedule.steps"),
    ("actor.loss.response_budget=7", r"actor.loss.response_budget=7 conflicts with rollout.sampling.max_new_tokens"),
    ("actor.parallel.tp=0", r"actor.parallel.tp must be >= 1, got 0"),
    ("actor.optim.lr=0", r"actor.optim.lr must be > 0"),
])
def test_bad_overrides_name_the_key(cfg, item, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(cfg, [item])


def test_dynamic_sampling_on_accuracy_is_refused_without_a_verifier_signal(cfg):
    assert apply_overrides(cfg, ["schedule.dynamic_sampling_on=reward"]).schedule.dynamic_sampling_on == "reward"
    with pytest.raises(ValueError, match=r"schedule.dynamic_sampling_on='accuracy' with reward.mode='internal'"):
        apply_overrides(cfg, ["schedule.dynamic_sampling=true", "schedule.dynamic_sampling_on=accuracy",
                              "reward.mode=internal"])


def test_actor_temperature_is_the_rollouts(synth_dir, tmp_path):
    """One stored temperature: --set on the rollout's changes what the actor computes log-probs at."""
    cfg = _train_config(synth_dir, str(tmp_path / "r"), ["--set", "rollout.sampling.temperature=0.7"])
    assert cfg.actor.temperature is None and cfg.resolved_actor().temperature == 0.7
    assert cfg.to_dict()["actor"]["temperature"] == 0.7
    # The resolved config.json builds the same run again: a derived value equal to its source is accepted.
    same = apply_overrides(cfg, ["actor.temperature=0.7"])
    assert same.resolved_actor() == cfg.resolved_actor()
    with pytest.raises(ValueError, match=r"actor.temperature=1.0 conflicts with rollout.sampling.temperature=0.7.*"
                                         r"leave actor.temperature unset"):
        apply_overrides(cfg, ["actor.temperature=1.0"])


def test_train_cli_applies_repeated_set(synth_dir, tmp_path):
    cfg = _train_config(synth_dir, str(tmp_path / "r"), ["--steps", "4", "--set", "schedule.mini_batches=2",
                                                          "--set", "reward.mode=grpo"])
    assert cfg.schedule.mini_batches == 2 and cfg.reward.mode == "grpo"
    assert cfg.resolved_actor().optim.total_steps == 8


def test_alias_flags_are_their_set_entries(synth_dir, tmp_path):
    """``--steps/--reward-mode/--tp/--pp/--resume/--no-progress/--no-packing`` give the same config.json as their ``--set``
    spellings, and a later entry wins whichever spelling either has."""
    out = str(tmp_path / "r")
    flags = _train_config(synth_dir, out, ["--steps", "3", "--reward-mode", "grpo", "--tp", "2", "--pp", "1",
                                           "--resume", "auto", "--no-progress", "--no-packing"])
    sets = _train_config(synth_dir, out, ["--set", "schedule.steps=3", "--set", "reward.mode=grpo",
                                          "--set", "actor.parallel.tp=2", "--set", "actor.parallel.pp=1",
                                          "--set", "checkpoint.resume=auto", "--set", "logging.progress=false",
                                          "--set", "actor.model.packing=false"])
    assert flags.to_dict() == sets.to_dict()
    assert flags.actor.model.packing is False and _train_config(synth_dir, out, []).actor.model.packing is True
    assert (flags.schedule.steps, flags.reward.mode, flags.actor.parallel.tp) == (3, "grpo", 2)
    assert flags.checkpoint.resume == "auto" and flags.logging.progress is False
    assert _train_config(synth_dir, out, ["--set", "schedule.steps=5", "--steps", "6"]).schedule.steps == 6
    assert _train_config(synth_dir, out, ["--steps", "6", "--set", "schedule.steps=5"]).schedule.steps == 5
    with pytest.raises(ValueError, match="reward.mode='nope'"):
        _train_config(synth_dir, out, ["--reward-mode", "nope"])
    with pytest.raises(ValueError, match="--set schedule.steps: 'x' is not a int"):
        _train_config(synth_dir, out, ["--steps", "x"])


def test_fp8_switches_reach_the_models_transformer_configs(synth_dir, tmp_path):
    """``--set actor.model.fp8=...`` on the RL config reaches the LM's TransformerConfig, and
    ``fp8_vision`` the ViT's and the merger's (built here without Transformer Engine)."""
    from dualrpo_mcore.models.qwen2_5_vl.model import transformer_configs
    from dualrpo_mcore.commands import train as cli
    from dualrpo_mcore.actor.megatron_setup import model_options, resolve_model_config

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
    cfg = apply_overrides(cfg, ["actor.loss.agg=seq-mean-token-sum-norm"])
    loss = cfg.resolved_actor().loss
    assert loss.response_budget == 24 and loss.token_sum_norm == 24  # tiny_cpu's budget
    assert cfg.actor.loss.response_budget is None  # derived, not stored
    cfg = apply_overrides(cfg, ["rollout.sampling.max_new_tokens=40"])
    assert cfg.resolved_actor().loss.token_sum_norm == 40
    assert cfg.to_dict()["actor"]["loss"]["response_budget"] == 40
    cfg = apply_overrides(cfg, ["actor.loss.max_response_length=64"])
    assert cfg.resolved_actor().loss.token_sum_norm == 64
    assert cfg.to_dict()["actor"]["loss"]["max_response_length"] == 64
    cfg = apply_overrides(cfg, ["actor.loss.max_response_length=none"])
    assert cfg.resolved_actor().loss.token_sum_norm == 40
    cfg.resolved_actor().loss.check_complete("actor.loss")
    with pytest.raises(ValueError, match="max_response_length must be >= 1"):
        apply_overrides(cfg, ["actor.loss.max_response_length=0"])


def test_no_packing_reaches_demo_stages_and_bench_train():
    """``dualrpo demo --no-packing`` turns packing off in its warm start and its RL stage; ``dualrpo bench
    train --no-packing`` in the actor it builds. Packing stays the default of all three."""
    from dualrpo_mcore.bench import train as bench_train
    from dualrpo_mcore.commands import demo

    def parse(module, argv):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        return parser.parse_args(argv)

    on, off = parse(demo, []), parse(demo, ["--no-packing"])
    assert "--no-packing" not in demo._sft_command(on, "d") and "--no-packing" in demo._sft_command(off, "d")
    assert "actor.model.packing=false" not in demo.rl_overrides(on)
    assert "actor.model.packing=false" in demo.rl_overrides(off)
    assert parse(bench_train, []).packing is True and parse(bench_train, ["--no-packing"]).packing is False
