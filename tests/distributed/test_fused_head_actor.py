"""``actor.model.fused_head`` on and off give the same numbers, end to end, on 2 gloo processes.

The tiny Qwen2.5-VL in fp32 at temperature 0.8, the same HF weights for both actors: the per-token statistics of the
log-prob pass, the loss and every parameter gradient of a loss that uses all three statistics, and
one real ``Actor.update`` (its loss and the weights after it) must agree within 1e-5. Settings:
TP = 2 (vocab-parallel head, hidden gradient summed over the group), TP = 1 with DP = 2 and uneven
rows (rank 0 runs filler micro-batches with no response token: an empty fused head), and TP = 2
with tied embeddings (the head's gradient must land on the input embedding).
"""
import pytest
import torch

from dualrpo_mcore.parallel.spawn import run_distributed

TOL = 1e-5


def _actor(tp, hf, fused, max_tokens):
    from dualrpo_mcore.actor.actor import Actor
    from dualrpo_mcore.actor.config import ActorConfig, MicroBatchConfig, ModelSourceConfig, OptimConfig, ParallelConfig

    cfg = ActorConfig(model=ModelSourceConfig(tiny=True, hf_config=hf.config, fused_head=fused),
                      parallel=ParallelConfig(tp=tp, pp=1, backend="gloo"),
                      optim=OptimConfig(lr=1e-3, total_steps=20, grad_clip=1.0, adam_eps=1e-3),
                      micro=MicroBatchConfig(max_tokens=max_tokens), temperature=0.8, seed=7)
    return Actor(cfg, hf_state_dict=hf.state_dict())


def _batch(cfg):
    from dualrpo_mcore.models.qwen2_5_vl import testing

    b = testing.make_batch(seed=3, rows=((), ((6, 8),), ((4, 4),), ()), patch_dim=cfg.patch_dim)
    resp = b["attention_mask"].clone()
    resp[:, :5] = 0
    b["response_mask"] = resp
    return b


def _grads(actor, batch):
    """Loss and parameter gradients of a loss over all three statistics (no optimizer step)."""
    def loss_fn(stats, mb, den):
        m = mb["response_mask"]
        loss = (-(stats["logprob"] * m).sum() + 0.3 * (stats["entropy"] * m).sum()
                - 0.2 * (stats["self_certainty"] * m).sum()) / den
        return loss, {}

    actor.model.zero_grad_buffer()
    _, micro = actor._split(batch)
    den = actor._denominator(batch, "token-mean")
    outs = actor._run(actor.model, micro, loss_fn, forward_only=False, denominator=den)
    loss = sum(float(o["loss"]) for o in outs)
    grads = {n: p.main_grad.detach().clone() for n, p in actor.module.named_parameters() if p.requires_grad}
    actor.model.zero_grad_buffer()
    return loss, grads


def _one(tp, hf, batch, fused, max_tokens=45):
    actor = _actor(tp, hf, fused, max_tokens)
    calls = []  # the fused path must never run Megatron's output layer
    actor.module.language_model.output_layer.register_forward_hook(lambda *_: calls.append(1))
    stats = actor.compute_token_stats(batch)
    loss, grads = _grads(actor, batch)
    g = torch.Generator().manual_seed(5)
    old = (stats["logprob"] + 0.1 * torch.randn(stats["logprob"].shape, generator=g)) * batch["response_mask"]
    adv = torch.linspace(-1.0, 1.0, batch["input_ids"].shape[0])
    metrics = actor.update(dict(batch, old_logprob=old, advantages=adv))
    weights = {k: v.clone() for k, v in actor.export_hf()}
    return dict(stats=stats, loss=loss, grads=grads, update_loss=metrics["loss"], weights=weights,
                output_layer_calls=len(calls))


def _all(rank, world_size):
    from dualrpo_mcore.models.qwen2_5_vl import from_hf, testing
    from dualrpo_mcore.actor import batching

    hf = testing.tiny_hf_model(seed=0)
    batch = _batch(from_hf(hf.config))
    out = {}
    for fused in (False, True):
        out[("tp2", fused)] = _one(2, hf, batch, fused)
        # DP = 2, uneven: rank 0 one row, rank 1 three, small micro-batches -> fillers on rank 0.
        rows = [0] if rank == 0 else [1, 2, 3]
        mine = batching.select_rows(batch, rows, batching.image_spans(batch, 200, 2))
        out[("dp2", fused)] = _one(1, hf, mine, fused, max_tokens=30)
    tied = testing.tiny_hf_model(seed=1, tie=True)
    for fused in (False, True):
        out[("tied", fused)] = _one(2, tied, batch, fused)
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(_all, 2, timeout=600)


def _max_diff(a, b):
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


@pytest.mark.parametrize("setting", ["tp2", "dp2", "tied"])
def test_fused_head_equals_unfused(results, setting):
    for rank, res in enumerate(results):
        off, on = res[(setting, False)], res[(setting, True)]
        what = f"{setting} rank {rank}"
        assert on["output_layer_calls"] == 0 and off["output_layer_calls"] > 0, what
        diffs = {k: _max_diff(on["stats"][k], off["stats"][k]) for k in on["stats"]}
        diffs["grads"] = max(_max_diff(on["grads"][n], off["grads"][n]) for n in off["grads"])
        print(f"{what}: max |fused - unfused| {diffs}")
        for k in ("logprob", "entropy", "self_certainty", "seq_self_certainty"):
            assert _max_diff(on["stats"][k], off["stats"][k]) <= TOL, (what, k)
        assert abs(on["loss"] - off["loss"]) <= TOL * max(1.0, abs(off["loss"])), (what, on["loss"], off["loss"])
        assert on["grads"].keys() == off["grads"].keys()
        head = [n for n in off["grads"] if "output_layer" in n or "word_embeddings" in n]
        assert head, "no output-layer / embedding parameter found"
        for name in off["grads"]:
            scale = max(1.0, float(off["grads"][name].abs().max()))
            assert _max_diff(on["grads"][name], off["grads"][name]) <= TOL * scale, (what, name)
        for name in head:  # the head's gradient is really there, on the parameter the layer uses
            assert float(on["grads"][name].abs().max()) > 0, (what, name)
        assert abs(on["update_loss"] - off["update_loss"]) <= TOL, (what, on["update_loss"], off["update_loss"])
        for name in off["weights"]:
            assert _max_diff(on["weights"][name], off["weights"][name]) <= TOL, (what, name)


def test_tied_model_has_no_separate_output_layer(results):
    names = results[0][("tied", True)]["grads"].keys()
    assert not any("output_layer" in n for n in names), sorted(names)
