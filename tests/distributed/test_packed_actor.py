"""Packed micro-batches (``actor.model.packing``, the default) give the padded path's numbers, on 2 gloo processes.

The tiny Qwen2.5-VL in fp32 at temperature 0.8; one actor per layout, its ``packing`` flipped between the two
runs so both see the same weights. Per layout and head: the statistics of ``compute_token_stats``, and for each
loss aggregation the policy loss (as ``Actor.update`` forms it) with the gradient of every parameter, plus a loss
over all three statistics (entropy and self-certainty gradients pass through the packed map too), must agree
within 1e-5 relative; then one real packed ``Actor.update`` must report the padded loss. Rows differ in length
and show images of different grids. Layouts (2 processes): TP=2 (fused head on and off), PP=2 (shapes differ
per micro-batch: Megatron's ``variable_seq_lengths``), and TP=1 as DP=2, first with the whole batch on both
ranks (several rows per stream), then with uneven shares (rank 0 one row and filler micro-batches).
"""
import dataclasses

import pytest
import torch

from dualrpo_mcore.parallel.spawn import run_distributed

TOL = 1e-5
AGGS = ("token-mean", "seq-mean", "seq-mean-token-sum-norm")
BUDGET = 40  # Dr. GRPO's L (the rollout's max_new_tokens)


def _batch():
    from dualrpo_mcore.models.qwen2_5_vl import testing

    # Rows of 5..36 tokens: text only, one 6x8 image, a 4x10 and a 6x6 image, text only, a 4x4 image.
    b = testing.make_batch(seed=3, rows=((), ((6, 8),), ((4, 10), (6, 6)), (), ((4, 4),)))
    resp = b["attention_mask"].clone()
    resp[:, :4] = 0
    b["response_mask"] = resp
    return b


def _actor(tp, pp, hf, max_tokens):
    from dualrpo_mcore.actor.actor import Actor
    from dualrpo_mcore.actor.config import ActorConfig, MicroBatchConfig, ModelSourceConfig, OptimConfig, ParallelConfig
    from dualrpo_mcore.algo import PolicyLossConfig

    cfg = ActorConfig(model=ModelSourceConfig(tiny=True, hf_config=hf.config),
                      parallel=ParallelConfig(tp=tp, pp=pp, backend="gloo"),
                      optim=OptimConfig(lr=1e-3, total_steps=20, grad_clip=1.0, adam_eps=1e-3),
                      micro=MicroBatchConfig(max_tokens=max_tokens), loss=PolicyLossConfig(response_budget=BUDGET),
                      temperature=0.8, seed=7)
    actor = Actor(cfg, hf_state_dict=hf.state_dict())
    assert actor.packing, "packing must be the default"
    fed = []  # (packed?, input shape) of every model forward
    actor.module.register_forward_pre_hook(
        lambda _m, args, kw: fed.append((kw.get("packed") is not None, tuple(args[0].shape))), with_kwargs=True)
    return actor, fed


def _loss_and_grads(actor, batch, loss_fn, agg):
    from dualrpo_mcore.actor.actor import _reduce_metrics

    actor.model.zero_grad_buffer()
    _, micro = actor._split(batch)
    outs = actor._run(actor.model, micro, loss_fn, forward_only=False, denominator=actor._denominator(batch, agg))
    loss = float(_reduce_metrics(outs)["loss"]) if outs else 0.0
    grads = {n: p.main_grad.detach().clone() for n, p in actor.module.named_parameters() if p.requires_grad}
    actor.model.zero_grad_buffer()
    return loss, grads


def _policy_fn(actor, agg):
    from dualrpo_mcore.algo import policy_loss

    cfg = dataclasses.replace(actor.config.loss, agg=agg)

    def loss_fn(stats, mb, den):
        return policy_loss(stats["logprob"], mb["old_logprob"], mb["advantages"], mb["response_mask"],
                           denominator=den, config=cfg)
    return loss_fn


def _all_stats_fn(stats, mb, den):
    m = mb["response_mask"]
    loss = (-(stats["logprob"] * m).sum() + 0.3 * (stats["entropy"] * m).sum()
            - 0.2 * (stats["self_certainty"] * m).sum()) / den
    return loss, {}


def _layout(actor, batch, fed, packing):
    """Everything compared, for one of the two layouts."""
    actor.packing = packing
    fed.clear()
    out = dict(stats=actor.compute_token_stats(batch))
    g = torch.Generator().manual_seed(5)
    lp = out["stats"]["logprob"]
    old = (lp + 0.1 * torch.randn(lp.shape, generator=g)) * batch["response_mask"]
    adv = torch.linspace(-1.0, 1.0, batch["input_ids"].shape[0])
    batch = dict(batch, old_logprob=old, advantages=adv)
    for agg in AGGS:
        out[agg] = _loss_and_grads(actor, batch, _policy_fn(actor, agg), agg)
    out["all_stats"] = _loss_and_grads(actor, batch, _all_stats_fn, "token-mean")
    out["fed"] = list(fed)
    out["update_input"] = batch
    return out


def _compare(actor, batch, fed, with_update=True):
    res = {"padded": _layout(actor, batch, fed, False), "packed": _layout(actor, batch, fed, True)}
    _, micro = actor._split(batch)
    res["streams"] = [(mb["attention_mask"].sum().item(), mb["packed"].total) for mb in micro]
    if with_update:  # the real update, packed, from the same weights: its loss is the padded token-mean loss
        fed.clear()
        res["update_loss"] = actor.update(res["packed"].pop("update_input"))["loss"]
        res["update_fed"] = list(fed)
    for r in ("padded", "packed"):
        res[r].pop("update_input", None)
    return res


def _all(rank, world_size):
    from dualrpo_mcore.actor import batching
    from dualrpo_mcore.models.qwen2_5_vl import testing

    hf = testing.tiny_hf_model(seed=0)
    batch = _batch()
    out = {}
    actor, fed = _actor(2, 1, hf, max_tokens=60)
    actor.config.model.fused_head = False
    out["tp2-unfused"] = _compare(actor, batch, fed, with_update=False)
    actor.config.model.fused_head = True
    out["tp2"] = _compare(actor, batch, fed)
    actor, fed = _actor(1, 2, hf, max_tokens=60)
    out["pp2"] = _compare(actor, batch, fed)
    actor, fed = _actor(1, 1, hf, max_tokens=60)
    out["tp1"] = _compare(actor, batch, fed, with_update=False)
    # Uneven DP shares: rank 0 one row, rank 1 four; at 30 tokens per micro-batch rank 0 runs fillers.
    actor.config.micro.max_tokens = 30
    rows = [0] if rank == 0 else [1, 2, 3, 4]
    mine = batching.select_rows(batch, rows, batching.image_spans(batch, testing.IMAGE, 2))
    out["dp2"] = _compare(actor, mine, fed)
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(_all, 2, timeout=600)


SETTINGS = ["tp2", "tp2-unfused", "pp2", "tp1", "dp2"]


def _rel(got, want):
    got, want = got.double(), want.double()
    return float((got - want).abs().max() / max(float(want.abs().max()), 1e-12)) if want.numel() else 0.0


@pytest.mark.parametrize("setting", SETTINGS)
def test_packed_statistics_equal_padded(results, setting):
    for rank, res in enumerate(results):
        padded, packed = res[setting]["padded"], res[setting]["packed"]
        for key in ("logprob", "entropy", "self_certainty", "seq_self_certainty"):
            assert packed["stats"][key].shape == padded["stats"][key].shape
            assert _rel(packed["stats"][key], padded["stats"][key]) <= TOL, (setting, rank, key)


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("loss", AGGS + ("all_stats",))
def test_packed_loss_and_gradients_equal_padded(results, setting, loss):
    for rank, res in enumerate(results):
        (l0, g0), (l1, g1) = res[setting]["padded"][loss], res[setting]["packed"][loss]
        what = f"{setting} {loss} rank {rank}"
        assert abs(l1 - l0) <= TOL * max(abs(l0), 1e-6), (what, l1, l0)
        assert g0.keys() == g1.keys() and g0, what
        bad = {n: _rel(g1[n], g0[n]) for n in g0 if _rel(g1[n], g0[n]) > TOL}
        assert not bad, f"{what}: gradients differ (relative) {bad}"
        if res[setting]["padded"]["stats"]["logprob"].abs().sum() > 0 and l0 != 0.0:
            assert any(float(g.abs().max()) > 0 for g in g0.values()), what


@pytest.mark.parametrize("setting", SETTINGS)
def test_the_model_is_fed_streams_only_when_packing(results, setting):
    for res in results:
        r = res[setting]
        assert r["padded"]["fed"] and not any(p for p, _ in r["padded"]["fed"])
        assert r["packed"]["fed"] and all(p and shape[0] == 1 for p, shape in r["packed"]["fed"])
        # T is the micro-batch's real tokens (no FP8 multiple here); a filler is its one row.
        assert all(total == real for real, total in r["streams"]), r["streams"]
        if "update_fed" in r:
            assert r["update_fed"] and all(p for p, _ in r["update_fed"])


def test_pipeline_streams_differ_in_length(results):
    """PP=2 really exchanges micro-batches of different T (several micro-batches per step)."""
    lengths = {total for _, total in results[0]["pp2"]["streams"]}
    assert len(lengths) > 1, results[0]["pp2"]["streams"]


def test_dp_filler_micro_batches(results):
    """Rank 0's one row and rank 1's four run the same number of micro-batches: rank 0's include fillers."""
    n0, n1 = (len(r["dp2"]["streams"]) for r in results)
    assert n0 == n1 > 1


@pytest.mark.parametrize("setting", ["tp2", "pp2", "dp2"])
def test_packed_update_reports_the_padded_loss(results, setting):
    for rank, res in enumerate(results):
        # Under DP each rank reports its own share; under PP the last stage's loss is broadcast.
        want = (results[-1] if setting == "pp2" else res)[setting]["padded"]["token-mean"][0]
        got = res[setting]["update_loss"]
        assert abs(got - want) <= TOL * max(abs(want), 1e-6), (setting, rank, got, want)
