"""The Megatron actor on 2 gloo processes, against independent references:

* token log-probs (TP=2, TP=1/DP=2, PP=2, and the loop's DP-split ``rollouts.token_stats``) equal
  transformers' Qwen2_5_VLForConditionalGeneration
  ``log_softmax``-gathered log-probs on the same weights (<= 1e-4), entropy and self-certainty too;
* one update's loss equals a float64 hand computation of the clipped surrogate (+ certainty-weighted
  k3 KL) on the HF model's log-probs; the update changes the weights;
* TP=2 (DP=1, whole batch) and TP=1 (DP=2, half the batch per rank, distributed optimizer sharded over
  the two ranks) give the same updated weights: the global token-mean denominator makes them equal;
* a NaN advantage poisons the step: it is skipped, the weights stay, and the limit aborts the run.

One spawned group runs every setting (re-initialising Megatron's state), since process start-up
dominates on 2 cores.
"""
import math

import pytest
import torch

from dualrpo_mcore.parallel.spawn import run_distributed

TOL = 1e-4
LR = 1e-3


def _batch(cfg):
    from dualrpo_mcore.models.qwen2_5_vl import testing

    # Four rows (two with images) so that halves are whole rows for the DP=2 run.
    b = testing.make_batch(seed=3, rows=((), ((6, 8),), ((4, 4),), ()), patch_dim=cfg.patch_dim)
    resp = b["attention_mask"].clone()
    resp[:, :5] = 0  # the first tokens are the "prompt"
    b["response_mask"] = resp
    return b


def _hf_stats(hf, batch):
    """float64 log-prob / entropy / self-certainty of every token from transformers' logits."""
    from dualrpo_mcore.models.qwen2_5_vl import testing

    with torch.no_grad():
        z = testing.hf_forward(hf, batch).double()[:, :-1]
    logp_all = torch.log_softmax(z, -1)
    lp = logp_all.gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    ent = -(logp_all.exp() * logp_all).sum(-1)
    sc = torch.logsumexp(z, -1) - z.mean(-1) - math.log(z.shape[-1])
    pad = torch.zeros(z.shape[0], 1, dtype=torch.float64)
    m = batch["response_mask"].double()
    return {k: torch.cat([pad, v], 1) * m for k, v in dict(logprob=lp, entropy=ent, self_certainty=sc).items()}


def _actor(tp, pp, hf, source=None, **kw):
    from dualrpo_mcore.actor.actor import Actor
    from dualrpo_mcore.actor.config import ActorConfig, BadStepConfig, KLConfig, MicroBatchConfig, ModelSourceConfig, OptimConfig, ParallelConfig

    src = ModelSourceConfig(**source) if source else ModelSourceConfig(tiny=True, hf_config=hf.config)
    cfg = ActorConfig(model=src,
                      parallel=ParallelConfig(tp=tp, pp=pp, backend="gloo"),
                      # A large Adam eps keeps the first update smooth in the gradient: with the default 1e-8,
                      # a gradient of ~1e-8 becomes a full +-lr step and amplifies fp32 rounding.
                      optim=OptimConfig(lr=LR, total_steps=20, grad_clip=1.0, adam_eps=1e-3),
                      micro=MicroBatchConfig(max_tokens=kw.pop("max_tokens", 45)),
                      kl=KLConfig(beta0=kw.pop("beta0", 0.0), normalizer="batch_minmax"),
                      bad_steps=BadStepConfig(max_consecutive=2), seed=7)
    return Actor(cfg, hf_state_dict=None if source else hf.state_dict())


def _weights(actor):
    return {k: v.clone() for k, v in actor.export_hf()}


def _rows(batch, rows):
    from dualrpo_mcore.actor import batching

    spans = batching.image_spans(batch, 200, 2)
    return batching.select_rows(batch, rows, spans)


def _update_inputs(batch, stats):
    g = torch.Generator().manual_seed(5)
    old = stats["logprob"] + 0.3 * torch.randn(stats["logprob"].shape, generator=g)
    return dict(batch, old_logprob=old * batch["response_mask"], advantages=torch.tensor([1.0, -0.7, 0.4, -1.2]),
                self_certainty=torch.tensor([0.3, 0.1, 0.5, 0.2]))


def _stats_diff(got, want):
    return {k: float((got[k].double() - want[k]).abs().max()) for k in want}


def _tp2_run(hf, batch, ref):
    actor = _actor(2, 1, hf, beta0=0.1)
    stats = actor.compute_token_stats(batch)
    inputs = _update_inputs(batch, stats)
    w0 = _weights(actor)
    metrics = actor.update(inputs)
    w1 = _weights(actor)
    ref_after = actor.compute_ref_logprobs(batch)  # the reference never moves
    # A second update on the same rollout: now policy != reference, so the KL term is live.
    metrics2 = actor.update(inputs)
    return dict(stats_diff=_stats_diff(stats, ref), metrics=metrics, metrics2=metrics2, weights=w1, stats=stats,
                ref_diff=float(
        (ref_after.double() - ref["logprob"]).abs().max()), changed=sum(not torch.equal(w0[k], w1[k]) for k in w0),
        inputs=inputs, seq_u=stats["seq_self_certainty"])


def _dp2_run(rank, hf, batch, ref):
    """TP=1 on 2 ranks = DP=2: each rank takes half the rows; the distributed optimizer shards."""
    actor = _actor(1, 1, hf, beta0=0.1)
    rows = [0, 1] if rank == 0 else [2, 3]
    half = _rows(batch, rows)
    stats = actor.compute_token_stats(half)
    full_inputs = _update_inputs(batch, _pad_stats(stats, rows, batch))
    metrics = actor.update(_rows(full_inputs, rows))
    return dict(stats_diff=_stats_diff(stats, {k: _rows(dict(batch, x=v), rows)["x"] for k, v in ref.items()}),
                weights=_weights(actor), metrics=metrics)


def _uneven_dp_run(rank, hf, batch, ref):
    """DP=2 with 1 row on rank 0 and 3 on rank 1 at a small token budget: rank 1 needs several
    micro-batches, so rank 0 runs filler ones; its results must be unaffected."""
    actor = _actor(1, 1, hf, max_tokens=30)
    rows = [0] if rank == 0 else [1, 2, 3]
    half = _rows(batch, rows)
    stats = actor.compute_token_stats(half)
    want = {k: _rows(dict(batch, x=v), rows)["x"] for k, v in ref.items()}
    n_micro = len(actor._split(half)[1])
    return dict(stats_diff=_stats_diff(stats, want), n_micro=n_micro)


def _dp_split_run(hf, batch, ref):
    """The loop's ``rollouts.token_stats`` at DP=2: each rank computes its share of the groups and the
    whole batch's stats come back on every rank; even (2 + 2 groups) and uneven (1 + 2) shares."""
    from types import SimpleNamespace

    from dualrpo_mcore.trainer import rollouts

    ctx = SimpleNamespace(actor=_actor(1, 1, hf), cfg=SimpleNamespace(rollout=SimpleNamespace(group_size=1)))
    diffs = {}
    for name, rows in (("even", [0, 1, 2, 3]), ("uneven", [0, 1, 2])):
        part = _rows(batch, rows)
        got = rollouts.token_stats(ctx, part)
        mask = part["response_mask"].double()
        want = {k: _rows(dict(batch, x=v), rows)["x"] for k, v in ref.items()}
        for k in want:
            assert got[k].shape == part["input_ids"].shape, (name, k, tuple(got[k].shape))
            diffs[f"{name}/{k}"] = float((got[k].double() * mask - want[k]).abs().max())
    return dict(stats_diff=diffs)


def _freeze_run(hf, batch):
    """Frozen ViT and a half-rate merger through Megatron's optimizer overrides."""
    from dualrpo_mcore.models.qwen2_5_vl.training import ModuleTraining

    src = dict(tiny=True, hf_config=hf.config, training=ModuleTraining(freeze_vision=True, lr_mult_merger=0.5))
    actor = _actor(2, 1, hf, source=src)
    # The source above starts from random Megatron init; the comparison is before/after the update.
    inputs = _update_inputs(batch, actor.compute_token_stats(batch))
    inputs.pop("self_certainty")
    w0 = _weights(actor)
    metrics = actor.update(inputs)
    w1 = _weights(actor)
    changed = {k: not torch.equal(w0[k], w1[k]) for k in w0}
    lrs = sorted({round(g["lr"] / metrics["lr"], 6) for g in actor.optimizer.param_groups})
    return dict(changed=changed, lr_ratios=lrs)


def _pad_stats(stats, rows, batch):
    """Both ranks' half-batch stats -> the full batch's (all-gathered), so old_logprob is identical."""
    import torch.distributed as dist

    b, s = batch["input_ids"].shape
    out = {}
    for k in ("logprob",):
        mine = torch.zeros(b, s)
        mine[rows, : stats[k].shape[1]] = stats[k]
        dist.all_reduce(mine)
        out[k] = mine
    return out


def _poison_run(hf, batch, hf_dir):
    from dualrpo_mcore.actor.badsteps import PoisonedStepError

    actor = _actor(2, 1, hf, source=dict(hf_dir=hf_dir))  # weights read from a HF directory this time
    stats = actor.compute_token_stats(batch)
    inputs = _update_inputs(batch, stats)
    inputs["advantages"] = torch.tensor([1.0, float("nan"), 0.4, -1.2])
    w0 = _weights(actor)
    first = actor.update(inputs)
    unchanged = all(torch.equal(v, w) for v, w in zip(w0.values(), _weights(actor).values()))
    try:
        actor.update(inputs)
        message = None
    except PoisonedStepError as e:
        message = str(e)
    return dict(first=first, unchanged=unchanged, message=message, stats=stats)


def _pp2_run(hf, batch, ref, ckpt, inputs):
    """PP=2 from a Megatron checkpoint converted at TP=1/PP=1 (resharded on load), KL on."""
    actor = _actor(1, 2, hf, source=dict(megatron_ckpt=ckpt), max_tokens=30, beta0=0.1)
    stats = actor.compute_token_stats(batch)
    metrics = actor.update(inputs)
    return dict(stats_diff=_stats_diff(stats, ref), metrics=metrics, weights=_weights(actor))


def _tied_run(batch, inputs):
    """Tied embeddings: at PP=2 the input embedding (stage 0) and output layer (stage 1) are one HF
    tensor, so their gradients must be summed; the update must equal the TP=2 (one stage) update."""
    from dualrpo_mcore.models.qwen2_5_vl import testing

    hf = testing.tiny_hf_model(seed=1, tie=True)
    plain = dict(inputs)
    plain.pop("self_certainty")
    out = {}
    for name, (tp, pp) in dict(tp2=(2, 1), pp2=(1, 2)).items():
        actor = _actor(tp, pp, hf, max_tokens=30)
        out[name] = dict(metrics=actor.update(plain), weights=_weights(actor))
    return out


def _all(rank, world_size, hf_dir, ckpt):
    from dualrpo_mcore.models.qwen2_5_vl import from_hf, testing

    hf = testing.tiny_hf_model(seed=0)
    batch = _batch(from_hf(hf.config))
    ref = _hf_stats(hf, batch)
    out = dict(tp2=_tp2_run(hf, batch, ref), dp2=_dp2_run(rank, hf, batch, ref))
    out["uneven"] = _uneven_dp_run(rank, hf, batch, ref)
    out["dpsplit"] = _dp_split_run(hf, batch, ref)
    out["freeze"] = _freeze_run(hf, batch)
    out["poison"] = _poison_run(hf, batch, hf_dir)
    out["pp2"] = _pp2_run(hf, batch, ref, ckpt, out["tp2"]["inputs"])
    out["tied"] = _tied_run(batch, out["tp2"]["inputs"])
    if rank == 0:
        out["ref"], out["batch"] = ref, batch
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from dualrpo_mcore.models.qwen2_5_vl import convert, testing

    root = tmp_path_factory.mktemp("actor_ckpt")
    testing.tiny_hf_model(seed=0).save_pretrained(root / "hf")
    ckpt = convert.hf_to_megatron(str(root / "hf"), str(root / "mcore_tp1"), tp=1, pp=1)
    return run_distributed(_all, 2, str(root / "hf"), ckpt, timeout=600)


@pytest.mark.parametrize("setting", ["tp2", "dp2", "pp2", "uneven", "dpsplit"])
def test_token_stats_match_transformers(results, setting):
    for rank, res in enumerate(results):
        bad = {k: v for k, v in res[setting]["stats_diff"].items() if not v <= TOL}
        assert not bad, f"{setting} rank {rank}: token stats differ from transformers by {bad}"


def _hand_loss(lp, ref_lp, inputs, beta0=0.1, beta_min=0.05, clip=0.2):
    """float64 eq. 5 on HF log-probs: token-mean of the clipped surrogate + beta(c) * k3(ref_lp - lp),
    c = min-max normalised u (the batch's ``self_certainty``)."""
    m = inputs["response_mask"].double()
    old = inputs["old_logprob"].double()
    adv = inputs["advantages"].double()[:, None]
    ratio = torch.exp(lp - old)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip))
    u = inputs["self_certainty"].double()
    c = (u - u.min()) / (u.max() - u.min())
    beta = (beta0 * (beta_min + (1 - beta_min) * (1 - c)))[:, None]
    d = ref_lp - lp
    k3 = torch.exp(d) - d - 1
    return float(((pg + beta * k3) * m).sum() / m.sum())


def _hf_with(weights):
    """transformers' model carrying exported (HF-named) actor weights."""
    from dualrpo_mcore.models.qwen2_5_vl import mapping, testing

    hf = testing.tiny_hf_model(seed=0)
    own = {mapping.normalize_hf_name(k): k for k in hf.state_dict()}
    hf.load_state_dict({own[k]: v for k, v in weights.items()}, strict=True)
    return hf


def test_update_loss_matches_float64_hand_computation_and_moves_weights(results):
    res0 = results[0]
    r = res0["tp2"]
    lp0 = res0["ref"]["logprob"]
    want = _hand_loss(lp0, lp0, r["inputs"])  # first update: policy == reference, k3 = 0
    assert abs(r["metrics"]["loss"] - want) <= 1e-5, (r["metrics"]["loss"], want)
    # Second update: the HF model loaded with the once-updated weights gives the policy log-probs.
    lp1 = _hf_stats(_hf_with(r["weights"]), res0["batch"])["logprob"]
    want2 = _hand_loss(lp1, lp0, r["inputs"])
    assert r["metrics2"]["kl_loss"] > 1e-7, "the KL term stayed zero after the policy moved"
    assert abs(r["metrics2"]["loss"] - want2) <= 1e-5, (r["metrics2"]["loss"], want2)
    assert r["metrics"]["clip_frac"] > 0  # the perturbed old log-probs exercise the clip
    assert r["metrics"]["skipped"] == 0 and math.isfinite(r["metrics"]["grad_norm"])
    assert r["changed"] > 10, "the update left the weights unchanged"
    assert r["ref_diff"] <= TOL, "the reference policy moved with the update"
    for res in results:
        assert res["tp2"]["metrics"]["loss"] == r["metrics"]["loss"]


def test_tp2_update_equals_dp2_update(results):
    w_tp2 = results[0]["tp2"]["weights"]
    for rank, res in enumerate(results):
        worst = max(float((res["dp2"]["weights"][k] - w_tp2[k]).abs().max()) for k in w_tp2)
        # Weights move by up to lr = 1e-3 here; 1e-6 is 0.1% of that and well above fp32 noise.
        assert worst <= 1e-6, f"rank {rank}: TP=2 and TP=1/DP=2 updates differ by {worst:.3g}"
    total = results[0]["dp2"]["metrics"]["loss"] + results[1]["dp2"]["metrics"]["loss"]
    assert abs(total - results[0]["tp2"]["metrics"]["loss"]) <= 1e-5  # each rank's share of the global mean


def test_poisoned_step_skipped_then_abort(results):
    for res in results:
        p = res["poison"]
        assert p["first"]["skipped"] == 1.0 and p["first"]["bad_steps_in_a_row"] == 1.0
        assert p["unchanged"], "a poisoned update reached the weights"
        assert p["message"] and "2 consecutive updates" in p["message"] and "max_consecutive=2" in p["message"]


def test_pp2_update_equals_tp2_update(results):
    w_tp2 = results[0]["tp2"]["weights"]
    loss_tp2 = results[0]["tp2"]["metrics"]["loss"]
    seen = set()
    for rank, res in enumerate(results):
        r = res["pp2"]
        assert abs(r["metrics"]["loss"] - loss_tp2) <= 1e-6, (rank, r["metrics"]["loss"], loss_tp2)
        worst = max(float((v - w_tp2[k]).abs().max()) for k, v in r["weights"].items())
        assert worst <= 1e-6, f"PP=2 stage {rank}: weights differ from the TP=2 update by {worst:.3g}"
        seen |= set(r["weights"])
    assert seen == set(w_tp2), "the two pipeline stages do not cover every weight"


def test_deterministic_and_hf_dir_source(results):
    # A second TP=2 actor, built from the saved HF directory, gives bit-identical statistics.
    for res in results:
        for k in ("logprob", "entropy", "self_certainty"):
            assert torch.equal(res["poison"]["stats"][k], res["tp2"]["stats"][k]), k


def test_tied_embeddings_pp2_update_equals_tp2(results):
    w_tp2 = results[0]["tied"]["tp2"]["weights"]
    emb = [k for k in w_tp2 if "embed_tokens" in k]
    assert emb and not any("lm_head" in k for k in w_tp2)  # tied: HF has no separate head
    for rank, res in enumerate(results):
        r = res["tied"]["pp2"]
        assert abs(r["metrics"]["loss"] - results[0]["tied"]["tp2"]["metrics"]["loss"]) <= 1e-6
        worst = max(float((v - w_tp2[k]).abs().max()) for k, v in r["weights"].items())
        assert worst <= 1e-6, f"tied PP=2 stage {rank}: weights differ from TP=2 by {worst:.3g}"
    assert any(k in results[0]["tied"]["pp2"]["weights"] for k in emb)  # stage 0 exports the embedding


def test_uneven_data_parallel_ranks_agree_on_microbatch_count(results):
    counts = [res["uneven"]["n_micro"] for res in results]
    assert counts[0] == counts[1] > 1, counts  # rank 0 (one row) padded up with filler micro-batches


def test_frozen_vision_and_lr_multiplier(results):
    for res in results:
        changed, lrs = res["freeze"]["changed"], res["freeze"]["lr_ratios"]
        vision = [k for k in changed if ".visual." in "." + k and ".merger." not in k]
        merger = [k for k in changed if ".merger." in k]
        language = [k for k in changed if k not in vision and k not in merger]
        assert vision and not any(changed[k] for k in vision), "a frozen ViT weight moved"
        assert any(changed[k] for k in merger) and any(changed[k] for k in language)
        assert lrs == [0.5, 1.0], f"param-group lr / base lr: {lrs}"
