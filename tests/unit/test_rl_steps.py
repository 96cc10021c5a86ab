"""RL-loop pieces that need no process group: config checks, the recipe registry, group filtering,
batch concatenation, overlong masking, dynamic sampling's drop-and-refill (``loop.collect``
with a stub rollout round and a stub shaping that records what it was given), and the split of a
step's batch into mini-batch updates (``loop.update`` with a stub actor), and the held-out eval's
pairing of answers with prompts (``evaluation.evaluate`` with a stub rollout and pool)."""
import json
import os
import types

import pytest
import torch

from dualrpo_mcore.actor import batching
from dualrpo_mcore.trainer import evaluation, loop, rollouts

G = 2


def _batch(rewards, lengths, overlong=None):
    """A text-only actor batch, one row per reward, prompt of 3 tokens, response of ``lengths[i]``."""
    b, s = len(rewards), 3 + max(lengths)
    ids = torch.arange(b * s).reshape(b, s) % 50 + 1
    attn = torch.zeros(b, s, dtype=torch.long)
    resp = torch.zeros(b, s, dtype=torch.long)
    for i, n in enumerate(lengths):
        attn[i, : 3 + n] = 1
        resp[i, 3: 3 + n] = 1
    r = torch.tensor(rewards, dtype=torch.float32)
    return dict(input_ids=ids * attn, attention_mask=attn, response_mask=resp, old_logprob=-resp.float(),
                accuracy=r.clamp(0, 1), reward=r, self_certainty=r.abs(), entropy=r.abs(), length=resp.sum(-1).float(),
                overlong=torch.tensor(overlong or [False] * b), task_id=torch.zeros(b, dtype=torch.long))


def test_flat_groups_and_rows():
    flat = batching.flat_groups(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5]), G)
    assert flat.tolist() == [True, False, True]
    assert batching.group_rows([1, 2], G) == [2, 3, 4, 5]


def test_concat_pads_token_axis_and_keeps_row_fields():
    a, b = _batch([1.0, 0.0], [2, 4]), _batch([0.5, 0.2], [6, 1])
    out = batching.concat([a, b])
    assert out["input_ids"].shape == (4, 9)
    assert out["reward"].tolist() == pytest.approx([1.0, 0.0, 0.5, 0.2])
    assert out["response_mask"].sum(-1).tolist() == [2, 4, 6, 1]
    assert torch.equal(out["attention_mask"][1, :7], a["attention_mask"][1])


def test_mask_overlong_clears_only_truncated_rows():
    batch = _batch([1.0, 0.0], [2, 4], overlong=[False, True])
    assert rollouts.mask_overlong(batch) == 1
    assert batch["response_mask"].sum(-1).tolist() == [2, 0]


def _fake_ctx(dynamic, rounds, want, on="reward"):
    cfg = types.SimpleNamespace(rollout=types.SimpleNamespace(group_size=G),
                                schedule=types.SimpleNamespace(prompts_per_step=want, dynamic_sampling=dynamic,
                                                               max_refill_rounds=rounds, dynamic_sampling_on=on))
    actor = types.SimpleNamespace(arch=types.SimpleNamespace(image_token_id=999, spatial_merge_size=2),
                                  info=types.SimpleNamespace(dp_size=1, dp_rank=0),
                                  global_loss=lambda out: out["loss"])
    return types.SimpleNamespace(cfg=cfg, actor=actor, rounds=0)


@pytest.fixture
def shaped(monkeypatch):
    """Stub ``loop.shape`` (token stats + shaping): the stub batches come shaped; record their accuracy."""
    seen = []

    def fake_shape(ctx, batch):
        seen.append(batch["accuracy"].tolist())
        return batch

    monkeypatch.setattr(loop, "shape", fake_shape)
    return seen


@pytest.mark.parametrize("dynamic", [False, True])
def test_dynamic_sampling_drops_flat_groups_and_refills(monkeypatch, shaped, dynamic):
    # Round 0: groups (flat, informative); round 1: (informative, flat); round 2 would be informative.
    rounds = [[1.0, 1.0, 0.0, 1.0], [0.3, 0.7, 0.0, 0.0], [0.1, 0.9]]
    asked = []

    def fake_generate(ctx, step, round_, num_prompts):
        asked.append(num_prompts)
        r = rounds[round_][: num_prompts * G]
        return _batch(r, [1 + i for i in range(len(r))])

    monkeypatch.setattr(loop, "generate", fake_generate)
    batch = loop.collect(_fake_ctx(dynamic, rounds=1, want=2), step=1)
    if not dynamic:
        assert asked == [2] and batch["reward"].tolist() == pytest.approx([1.0, 1.0, 0.0, 1.0])
    else:
        # One informative group from round 0, one refill round asked for the missing group.
        assert asked == [2, 1]
        assert batch["reward"].tolist() == pytest.approx([0.0, 1.0, 0.3, 0.7])


def test_dynamic_sampling_gives_up_after_max_rounds(monkeypatch, shaped):
    monkeypatch.setattr(loop, "generate", lambda ctx, step, round_, n: _batch([1.0] * (n * G), [1] * (n * G)))
    ctx = _fake_ctx(True, rounds=2, want=2)
    assert loop.collect(ctx, step=1) is None
    assert ctx.rounds == 3


@pytest.mark.parametrize("on", ["accuracy", "reward"])
def test_dynamic_sampling_filters_on_verifier_or_shaped_reward(monkeypatch, shaped, on):
    """An all-wrong group under DualRPO: accuracy flat at 0, shaped rewards -lam*u differ. Filtering on
    'accuracy' drops it; filtering on 'reward' keeps it."""
    def fake_generate(ctx, step, round_, num_prompts):
        b = _batch([0.0, 0.0, 0.0, 1.0][: num_prompts * G], [1, 2, 3, 4][: num_prompts * G])
        b["reward"] = b["reward"] - 0.005 * torch.tensor([0.2, 0.7, 0.1, 0.3])[: num_prompts * G]
        return b

    monkeypatch.setattr(loop, "generate", fake_generate)
    batch = loop.collect(_fake_ctx(True, rounds=0, want=2, on=on), step=1)
    kept = batch["accuracy"].tolist()
    assert kept == ([0.0, 1.0] if on == "accuracy" else [0.0, 0.0, 0.0, 1.0])
    # On 'accuracy' the flat group is dropped before the old-policy forward, which then sees only the kept one.
    assert shaped == ([[0.0, 1.0]] if on == "accuracy" else [[0.0, 0.0, 0.0, 1.0]])


def test_rl_config_checks_name_the_field(tmp_path):
    from dualrpo_mcore.trainer.rl_config import EvalConfig, RewardConfig, RolloutConfig, ScheduleConfig

    with pytest.raises(ValueError, match="reward.mode"):
        RewardConfig(mode="nope")
    with pytest.raises(ValueError, match="rollout.group_size"):
        RolloutConfig(group_size=1)
    with pytest.raises(ValueError, match="eval.heldout"):
        EvalConfig(every=2)
    with pytest.raises(ValueError, match="schedule.steps"):
        ScheduleConfig(steps=0)
    with pytest.raises(ValueError, match="schedule.dynamic_sampling_on"):
        ScheduleConfig(dynamic_sampling_on="u")
    # The old spelling is refused, not aliased: the error names the field and the new value.
    with pytest.raises(ValueError, match=r"schedule\.dynamic_sampling_on='v'.*renamed to 'accuracy'"):
        ScheduleConfig(dynamic_sampling_on="v")
    assert ScheduleConfig().dynamic_sampling_on == "accuracy"
    with pytest.raises(ValueError, match="schedule.mini_batches"):
        ScheduleConfig(mini_batches=0)
    with pytest.raises(ValueError, match="schedule.epochs"):
        ScheduleConfig(epochs=0)


def test_tiny_cpu_recipe_and_cli_overrides(synth_dir, tmp_path):
    import argparse
    import dataclasses
    import json

    from dualrpo_mcore.commands import train as cli
    from dualrpo_mcore.trainer.recipes import RECIPES

    assert "tiny_cpu" in RECIPES
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--data", synth_dir, "--out", str(tmp_path / "run"), "--steps", "7",
                              "--reward-mode", "grpo", "--resume", "auto", "--tp", "2"])
    cfg = cli.config_from_args(args)
    assert cfg.schedule.steps == 7 == cfg.resolved_actor().optim.total_steps
    assert cfg.reward.mode == "grpo" and cfg.actor.parallel.tp == 2 and cfg.checkpoint.resume == "auto"
    assert cfg.resolved_actor().temperature == cfg.rollout.sampling.temperature
    resolved = json.loads(json.dumps(cfg.to_dict()))
    assert resolved["reward_mode"] == "grpo" and resolved["schedule"]["steps"] == 7
    with pytest.raises(ValueError, match="actor.temperature=0.5 conflicts"):
        dataclasses.replace(cfg, actor=dataclasses.replace(cfg.actor, temperature=0.5))


def test_responses_end_before_a_sampled_image_placeholder():
    ids, lps, finish = rollouts.cut_at_media([5, 6, 877, 7], [-1.0, -2.0, -3.0, -4.0], "length", {877, 878})
    assert (ids, lps, finish) == ([5, 6], [-1.0, -2.0], "stop")
    assert rollouts.cut_at_media([5, 6], [-1.0, -2.0], "length", {877}) == ([5, 6], [-1.0, -2.0], "length")


class _RecordingEngine:
    """Records the colocation calls in order (what SGLang needs: memory back only around generation,
    new weights loaded before the KV cache returns)."""

    def __init__(self):
        self.calls = []

    def resume_memory(self, weights=None):
        self.calls.append(("resume", None if weights is None else [n for n, _ in weights]))

    def release_memory(self):
        self.calls.append(("release",))

    def generate(self, requests, params):
        self.calls.append(("generate", len(requests)))
        from dualrpo_mcore.rollout import Sample

        return [[Sample([5, 2], [-0.1, -0.2], "stop")] * params.n for _ in requests]


def test_engine_memory_is_held_only_around_generation_and_weights_load_on_resume(monkeypatch):
    from dualrpo_mcore.rollout import SamplingParams

    monkeypatch.setattr(rollouts, "broadcast", lambda obj: obj)
    t = torch.zeros(2)
    exporter = types.SimpleNamespace(buckets=lambda model: iter([[("a", t), ("b", t)], [("c", t)]]))
    engine = _RecordingEngine()
    cfg = types.SimpleNamespace(rollout=types.SimpleNamespace(engine_on_every_rank=False))
    ctx = types.SimpleNamespace(rank0=True, engine=engine, exporter=exporter, cfg=cfg,
                                actor=types.SimpleNamespace(model=None, arch=types.SimpleNamespace(
                                    image_token_id=999, video_token_id=998)))
    prompt = types.SimpleNamespace(input_ids=[1, 2, 3], pixel_values=None, image_grid_thw=None, images=[], uid="p")
    out = rollouts.rollout(ctx, [prompt], SamplingParams(n=2, max_new_tokens=4))
    assert len(out[0]) == 2
    rollouts.sync(ctx)
    assert engine.calls == [("resume", None), ("generate", 1), ("release",), ("resume", ["a", "b", "c"])]
    # A rank without the engine still walks every bucket (the export is collective).
    walked = []
    ctx_other = types.SimpleNamespace(rank0=False, engine=None, actor=ctx.actor, exporter=types.SimpleNamespace(
        buckets=lambda model: (walked.append(i) or [] for i in range(3))))
    rollouts.sync(ctx_other)
    assert walked == [0, 1, 2]


@pytest.mark.parametrize("mini,epochs", [(1, 1), (2, 1), (2, 2), (5, 1)])
def test_update_splits_the_step_into_group_aligned_mini_batches(monkeypatch, mini, epochs):
    """Three groups: each update gets a contiguous run of whole groups, every epoch passes over all of
    them in order, and the metrics merge as documented (means, extremes, last lr)."""
    batch = _batch([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [1, 2, 3, 4, 5, 6])
    got = []

    def fake_update(mb):
        i = len(got)
        got.append(mb["reward"].tolist())
        return dict(loss=float(i), ratio_max=1.0 + i, ratio_min=1.0 - i / 10, lr=10.0 * i, skipped=float(i == 1))

    ctx = _fake_ctx(False, rounds=0, want=3)
    ctx.cfg.schedule.mini_batches, ctx.cfg.schedule.epochs = mini, epochs
    ctx.actor.update = fake_update
    metrics = loop.update(ctx, batch)
    rows = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    parts = {1: [rows], 2: [rows[:2], rows[2:]], 5: [rows[:2], rows[2:4], rows[4:]]}[mini]
    assert got == [pytest.approx(p) for p in parts * epochs]
    n = len(got)
    assert metrics["updates"] == n
    assert metrics["loss"] == pytest.approx(sum(range(n)) / n)
    assert metrics["ratio_max"] == n and metrics["ratio_min"] == pytest.approx(1.0 - (n - 1) / 10)
    assert metrics["lr"] == 10.0 * (n - 1)
    assert metrics["skipped"] == pytest.approx((1.0 if n > 1 else 0.0) / n)


def test_update_with_nothing_to_train_reports_no_update(monkeypatch):
    batch = _batch([0.1, 0.2], [1, 2])
    batch["response_mask"].zero_()
    ctx = _fake_ctx(False, rounds=0, want=1)
    ctx.cfg.schedule.mini_batches, ctx.cfg.schedule.epochs = 1, 1
    ctx.actor.update = lambda mb: pytest.fail("an update without response tokens")
    assert loop.update(ctx, batch) == {"no_update": 1.0}


def test_evaluate_scores_each_prompt_against_its_own_answer_greedily(monkeypatch, tmp_path):
    """``evaluation.evaluate`` with a stub rollout (prompt i answers i on even i, 'no' on odd) and a stub
    pool that checks text against the prompt's answer: per-task accuracy by hand."""
    from dualrpo_mcore.rollout.engine import SamplingParams

    levels = [1, 1, 1, None, 2, 2]  # prompt 3 has no difficulty: left out of the split only
    prompts = [types.SimpleNamespace(task=("math", "ocr")[i % 2 if i < 4 else 0], reward={"answer": str(i)},
                                     difficulty=levels[i], uid=f"p{i}")
               for i in range(6)]  # math: 0, 2, 4, 5 -> right on 0, 2, 4; ocr: 1, 3 -> none right
    seen = {}

    def fake_rollout(ctx, ps, params):
        seen["params"] = params
        return [[([i if i % 2 == 0 else 100], [0.0], "stop")] for i in range(len(ps))]

    monkeypatch.setattr(evaluation, "rollout", fake_rollout)
    pool = types.SimpleNamespace(verify_batch=lambda specs, texts, progress: [
        types.SimpleNamespace(reward=float(t == s["answer"])) for s, t in zip(specs, texts)])
    tokenizer = types.SimpleNamespace(decode=lambda ids, skip_special_tokens: "no" if ids == [100] else str(ids[0]))
    cfg = types.SimpleNamespace(eval=types.SimpleNamespace(every=5, heldout="h.parquet", greedy=True),
                                rollout=types.SimpleNamespace(sampling=SamplingParams(temperature=1.0), seed=7,
                                                              engine_on_every_rank=True),
                                schedule=types.SimpleNamespace(steps=10),
                                logging=types.SimpleNamespace(run_dir=str(tmp_path)))
    ctx = types.SimpleNamespace(cfg=cfg, rank0=True, heldout=prompts, pool=pool, tokenizer=tokenizer)
    out = evaluation.evaluate(ctx, 5)
    assert out["eval/accuracy/math"] == pytest.approx(3 / 4) and out["eval/accuracy/ocr"] == 0.0
    assert out["eval/accuracy/all"] == pytest.approx(3 / 6)
    split = {k: v for k, v in out.items() if k.startswith("eval/by_difficulty/")}
    # math d1: prompts 0, 2 both right; math d2: 4 right, 5 wrong; ocr d1: prompt 1 wrong
    assert split == {"eval/by_difficulty/accuracy/math/d1": 1.0, "eval/by_difficulty/accuracy/math/d2": 0.5,
                     "eval/by_difficulty/accuracy/ocr/d1": 0.0, "eval/by_difficulty/count/math/d1": 2.0,
                     "eval/by_difficulty/count/math/d2": 2.0, "eval/by_difficulty/count/ocr/d1": 1.0}
    assert seen["params"].temperature == 0.0 and seen["params"].n == 1 and seen["params"].seed == 7
    # The record on disk pairs each prompt with its own accuracy (a paired comparison needs exactly that).
    with open(evaluation.eval_path(str(tmp_path), 5)) as f:
        record = json.load(f)
    assert [(r["uid"], r["task"], r["accuracy"]) for r in record["per_prompt"]] == [
        ("p0", "math", 1.0), ("p1", "ocr", 0.0), ("p2", "math", 1.0), ("p3", "ocr", 0.0), ("p4", "math", 1.0),
        ("p5", "math", 0.0)]
    assert record["accuracy"]["math"] == pytest.approx(3 / 4) and record["step"] == 5
    assert not os.path.exists(evaluation.eval_path(str(tmp_path), 6))
    ctx.rank0 = False  # the other ranks generate their share and report nothing
    assert evaluation.evaluate(ctx, 5) == {}
