"""A step's loss and gradients do not depend on how its rows are split (issue 30), on 2 gloo processes.

For every aggregation (token-mean, seq-mean, seq-mean-token-sum-norm), with and without rows that the
overlong filter has emptied, one ``Actor.update`` runs as 1, 2 and 4 micro-batches, at DP=1 (TP=2 over
the two processes) and at DP=2 (TP=1, half the groups per rank). Each run's loss and the gradient of
every parameter (read where the optimizer would consume it, then the step is dropped so every run
starts from the same weights) are compared with an independent float64 computation: transformers'
model on the same weights, the clipped surrogate and the aggregation written out in this file over
the whole batch, autograd for the gradients. The layouts are also compared with each other.

Dr. GRPO's divisor reaches the actor the way a run's does: ``RLConfig`` derives it from the rollout's
``max_new_tokens``. Responses are shorter than that budget and prompts vary in length, so a divisor
taken from a micro-batch's width (prompt tokens included) is caught by every layout.

One spawned group runs every setting; rank 0 holds the reference and returns only the differences.
"""
import pytest
import torch

from dualrpo_mcore.parallel.spawn import run_distributed

AGGS = ("token-mean", "seq-mean", "seq-mean-token-sum-norm")
LAYOUTS = (1, 2, 4)
BUDGET = 12  # the rollout's max_new_tokens
RESPONSE_LENGTHS = (12, 3, 7, 1, 10, 5, 12, 2)
IMAGES = ((), ((4, 4),), (), ((4, 4),), ((4, 4),), (), ((4, 4),), ())
ADVANTAGES = (1.0, -0.3, 0.8, -1.1, 0.5, 0.9, -0.2, 1.3)
# Both in the first half: at DP=2 the two ranks hold 2 and 4 non-empty rows, so a local count is wrong.
EMPTIED = (1, 2)
CLIP = 0.2
LOSS_RTOL = 1e-5
GRAD_RTOL_SPLIT = 1e-5  # between layouts: both fp32, the same math in another order
GRAD_RTOL_REF = 1e-5  # fp32 trainer against the float64 reference


def _batch():
    """8 rows (4 groups of 2): prompts of varied length, half with an image, then responses of
    ``RESPONSE_LENGTHS`` tokens (at most the budget), right-padded."""
    from dualrpo_mcore.models.qwen2_5_vl import testing

    prompts = testing.make_batch(seed=11, rows=IMAGES, patch_dim=96)
    g = torch.Generator().manual_seed(12)
    b = len(IMAGES)
    lengths = prompts["attention_mask"].sum(-1)
    width = int((lengths + torch.tensor(RESPONSE_LENGTHS)).max())
    ids = torch.zeros(b, width, dtype=torch.long)
    resp = torch.zeros(b, width, dtype=torch.long)
    for r in range(b):
        p, n = int(lengths[r]), RESPONSE_LENGTHS[r]
        ids[r, :p] = prompts["input_ids"][r, :p]
        ids[r, p:p + n] = torch.randint(3, 198, (n,), generator=g)
        resp[r, p:p + n] = 1
    attn = (torch.arange(width)[None] < (lengths + torch.tensor(RESPONSE_LENGTHS))[:, None]).long()
    return dict(input_ids=ids, attention_mask=attn, response_mask=resp, pixel_values=prompts["pixel_values"],
                image_grid_thw=prompts["image_grid_thw"])


def _model_inputs(batch, dtype):
    out = {k: batch[k] for k in ("input_ids", "attention_mask", "image_grid_thw")}
    out["pixel_values"] = batch["pixel_values"].to(dtype)
    return out


def _token_logprobs(hf, batch):
    """log p of every token under transformers' model, ``[B, S]``, column 0 zero (no prediction)."""
    from dualrpo_mcore.models.qwen2_5_vl import testing

    z = testing.hf_forward(hf, _model_inputs(batch, torch.float64))[:, :-1]
    lp = torch.log_softmax(z, -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return torch.cat([lp.new_zeros(lp.shape[0], 1), lp], 1)


def _reference_loss(lp, inputs, agg):
    """float64 clipped surrogate over the whole batch, aggregated by the written rule: rows without
    response tokens are not in the batch; Dr. GRPO divides each row's token sum by the budget."""
    m = inputs["response_mask"].double()
    adv = inputs["advantages"].double()[:, None]
    ratio = torch.exp(lp - inputs["old_logprob"].double())
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - CLIP, 1 + CLIP)) * m
    rows = [r for r in range(m.shape[0]) if m[r].sum() > 0]
    if agg == "token-mean":
        return pg.sum() / m.sum()
    if agg == "seq-mean":
        return sum(pg[r].sum() / m[r].sum() for r in rows) / len(rows)
    return sum(pg[r].sum() / BUDGET for r in rows) / len(rows)


def _inputs(batch, lp, emptied):
    g = torch.Generator().manual_seed(13)
    m = batch["response_mask"].clone()
    if emptied:
        m[list(EMPTIED)] = 0  # what rollouts.mask_overlong does to rows that hit the budget
    old = (lp.float() + 0.3 * torch.randn(lp.shape, generator=g)) * batch["response_mask"]
    return dict(batch, response_mask=m, old_logprob=old, advantages=torch.tensor(ADVANTAGES))


def _references(hf64, batch, lp, settings):
    """Loss and HF-named gradients of every setting from one float64 forward."""
    from dualrpo_mcore.models.qwen2_5_vl import mapping

    named = [(mapping.normalize_hf_name(k), p) for k, p in hf64.named_parameters()]
    out = {}
    for key, inputs in settings.items():
        loss = _reference_loss(lp, inputs, key[0])
        grads = torch.autograd.grad(loss, [p for _, p in named], retain_graph=True, allow_unused=True)
        out[key] = (loss.item(), {k: (g if g is not None else torch.zeros_like(p)).float()
                                  for (k, p), g in zip(named, grads)})
    return out


def _actor(hf, tp):
    from dualrpo_mcore.data import DataConfig, SourceConfig
    from dualrpo_mcore.rollout.engine import SamplingParams
    from dualrpo_mcore.actor.actor import Actor
    from dualrpo_mcore.actor.config import ActorConfig, MicroBatchConfig, ModelSourceConfig, OptimConfig, ParallelConfig
    from dualrpo_mcore.trainer.rl_config import RLConfig, RolloutConfig, ScheduleConfig

    actor = ActorConfig(model=ModelSourceConfig(tiny=True, hf_config=hf.config),
                        parallel=ParallelConfig(tp=tp, pp=1, backend="gloo"),
                        # Not sharded: after the data-parallel all-reduce every rank holds every gradient.
                        optim=OptimConfig(lr=1e-3, distributed_optimizer=False),
                        micro=MicroBatchConfig(max_tokens=10 ** 6), seed=7)
    # The RL root derives Dr. GRPO's divisor from the rollout's budget (and the warm-up length from the
    # schedule: 10 updates), as in a run.
    cfg = RLConfig(actor=actor, data=DataConfig(sources=[SourceConfig(path="unused.jsonl")], processor_dir="unused"),
                   rollout=RolloutConfig(sampling=SamplingParams(max_new_tokens=BUDGET)),
                   schedule=ScheduleConfig(steps=10))
    return Actor(cfg.resolved_actor(), hf_state_dict=hf.state_dict())


def _hf_named_grads(actor):
    """Every parameter's gradient as the optimizer would read it, TP-gathered into HF naming: the weight
    export is linear, so it maps gradients as it maps weights."""
    params = [p for p in actor.module.parameters() if p.requires_grad]
    saved = [p.data for p in params]
    try:
        for p in params:
            p.data = p.main_grad.view_as(p)
        return {k: v.detach().clone().float() for k, v in actor.export_hf()}
    finally:
        for p, d in zip(params, saved):
            p.data = d


def _cap_for(batch, k):
    """A micro-batch token cap that cuts ``batch`` into exactly ``k`` micro-batches."""
    from dualrpo_mcore.actor.microbatch import partition

    lengths = batch["attention_mask"].sum(-1).tolist()
    for cap in range(int(sum(lengths)), 0, -1):
        if len(partition(lengths, cap)) == k:
            return cap
    raise AssertionError(f"no token cap gives {k} micro-batches for lengths {lengths}")


def _rel(got, want):
    """The largest per-parameter ||got - want|| / ||want||."""
    return max(float((got[k] - w).norm() / w.norm().clamp(min=1e-30)) for k, w in want.items())


def _one_update(actor, inputs, agg, k):
    """Loss (summed over data-parallel ranks) and gradients of one update in ``k`` micro-batches."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    box = {}

    def step():  # the gradient the step would use; the weights stay for the next setting
        box["grads"] = _hf_named_grads(actor)
        return True, 0.0, 0

    actor.optimizer.step = step
    actor.config.loss.agg = agg
    actor.config.micro.max_tokens = _cap_for(inputs, k)
    metrics = actor.update(inputs)
    loss = torch.tensor([metrics["loss"]], dtype=torch.float64)
    if actor.info.dp_size > 1:
        dist.all_reduce(loss, group=ps.get_data_parallel_group())
    return float(loss[0]), box["grads"], int(metrics["num_microbatches"])


def _all(rank, world_size):
    from dualrpo_mcore.models.qwen2_5_vl import testing
    from dualrpo_mcore.actor import batching

    hf = testing.tiny_hf_model(seed=0)
    hf64 = testing.tiny_hf_model(seed=0).double()
    batch = _batch()
    with torch.no_grad():
        lp0 = _token_logprobs(hf64, batch)
    settings = {(agg, e): _inputs(batch, lp0, e) for agg in AGGS for e in (False, True)}
    ref = None
    if rank == 0:
        ref = _references(hf64, batch, _token_logprobs(hf64, batch), settings)
    spans = batching.image_spans(batch, testing.IMAGE, 2)
    half = [0, 1, 2, 3] if rank == 0 else [4, 5, 6, 7]
    out, first = [], {}
    for dp, tp in ((1, 2), (2, 1)):
        actor = _actor(hf, tp)
        for (agg, emptied), inputs in settings.items():
            mine = inputs if dp == 1 else batching.select_rows(inputs, half, spans)
            for k in LAYOUTS:
                loss, grads, n_micro = _one_update(actor, mine, agg, k)
                if rank != 0:
                    continue
                want_loss, want_grads = ref[(agg, emptied)]
                base = first.setdefault((agg, emptied), grads)  # DP=1 in one micro-batch
                out.append(dict(dp=dp, agg=agg, emptied=emptied, k=k, n_micro=n_micro, loss=loss, ref_loss=want_loss,
                                loss_rel=abs(loss - want_loss) / abs(want_loss), grad_rel_ref=_rel(grads, want_grads),
                                grad_rel_split=_rel(grads, base)))
    out += _uneven_shares(actor, hf64, batch, spans, rank)  # the DP=2 actor of the last setting
    return out


def _uneven_shares(actor, hf64, batch, spans, rank):
    """3 groups and 1 group over 2 data-parallel ranks, each rank's share cut by the loop's own rule
    (``batching.dp_slice``): every group must be trained on exactly once (3 = 1 + 2; 1 = a filler that
    adds nothing + 1), so the loss and gradients equal the float64 reference over all of the rows."""
    from dualrpo_mcore.models.qwen2_5_vl import testing
    from dualrpo_mcore.actor import batching

    out = []
    for groups in (3, 1):
        rows = list(range(2 * groups))
        sub = batching.select_rows(batch, rows, spans)
        with torch.no_grad():
            lp0 = _token_logprobs(hf64, sub)
        settings = {(agg, False): _inputs(sub, lp0, False) for agg in AGGS}
        for key in settings:
            settings[key]["advantages"] = settings[key]["advantages"][: len(rows)]
        ref = _references(hf64, sub, _token_logprobs(hf64, sub), settings) if rank == 0 else None
        for (agg, _), inputs in settings.items():
            mine = batching.dp_slice(inputs, 2, testing.IMAGE, 2, dp=2, rank=rank)
            loss, grads, n_micro = _one_update(actor, mine, agg, 1)
            if rank == 0:
                want_loss, want_grads = ref[(agg, False)]
                out.append(dict(dp=2, agg=agg, emptied=False, k=f"{groups} groups", n_micro=n_micro, loss=loss,
                                ref_loss=want_loss, loss_rel=abs(loss - want_loss) / abs(want_loss),
                                grad_rel_ref=_rel(grads, want_grads), grad_rel_split=0.0, uneven=True))
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(_all, 2, timeout=600)[0]


def _table(rows):
    return "\n".join(f"dp={r['dp']} {r['agg']:<24} emptied={r['emptied']!s:<5} k={r['k']!s}: loss {r['loss']:.8g} "
                     f"(ref {r['ref_loss']:.8g}, rel {r['loss_rel']:.2e}) grad rel ref {r['grad_rel_ref']:.2e} "
                     f"split {r['grad_rel_split']:.2e}" for r in rows)


def test_every_setting_ran_in_its_layout(results):
    even = [r for r in results if not r.get("uneven")]
    assert len(even) == 2 * len(AGGS) * 2 * len(LAYOUTS)
    assert all(r["n_micro"] == r["k"] for r in even), _table(even)
    assert len(results) - len(even) == 2 * len(AGGS)


@pytest.mark.parametrize("agg", AGGS)
def test_loss_equals_the_float64_reference_in_every_layout(results, agg):
    rows = [r for r in results if r["agg"] == agg]
    assert all(r["loss_rel"] <= LOSS_RTOL for r in rows), _table(rows)


@pytest.mark.parametrize("agg", AGGS)
def test_gradients_do_not_depend_on_the_split(results, agg):
    rows = [r for r in results if r["agg"] == agg]
    assert all(r["grad_rel_split"] <= GRAD_RTOL_SPLIT for r in rows), _table(rows)
    assert all(r["grad_rel_ref"] <= GRAD_RTOL_REF for r in rows), _table(rows)
