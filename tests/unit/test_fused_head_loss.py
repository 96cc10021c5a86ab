"""``fused_head_loss`` (gradients formed in the forward) at TP = 1 against float64.

The reference forms the logits in float64, applies the float64 statistics of
``helpers.token_stats_ref`` and the same loss, and differentiates by float64 autograd. Losses: a
weighted sum of all three statistics with per-token weights (every gradient column of the kernel),
and the actor's clipped surrogate + k3 KL under each aggregation. Several chunks, masked rows,
ignore labels, temperature; fp32 and bf16; both backends.
"""
import pytest
import torch

from dualrpo_mcore.algo.loss import LOSS_AGGREGATIONS, PolicyLossConfig, policy_loss
from dualrpo_mcore.ops import TokenStats, fused_head, fused_head_loss
from helpers.backends import BACKENDS
from helpers.close import assert_close
from helpers.head_ref import H, TEMP, VOCAB, make_inputs
from helpers.token_stats_ref import reference

B, S = 4, 7
ROWS = B * S


def _weights(seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(ROWS, generator=g, dtype=torch.float64) for _ in range(3)]


def linear_loss(weights):
    def fn(ts):
        loss = sum((w.to(t.dtype) * t).sum() for w, t in zip(weights, ts[:3]))
        return loss, {"n": len(ts)}
    return fn


def policy(agg, mask, clip=0.2):
    """The actor's loss on [B, S]: clipped surrogate with per-row advantages, k3 KL to a reference.
    The old and reference log-probs lie near the current ones (ratios inside and outside the clip;
    half-precision tests open the clip: a bf16 log-prob may cross its edge, where the gradient jumps)."""
    g = torch.Generator().manual_seed(11)
    h, w, labels, _ = make_inputs(torch.float64, rows=ROWS)
    now = reference(h @ w.t(), labels, VOCAB, TEMP)[0].reshape(B, S)
    old = now + 0.3 * torch.randn(B, S, generator=g, dtype=torch.float64)
    ref = now + 0.3 * torch.randn(B, S, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    keep = mask.reshape(B, S)
    cfg = PolicyLossConfig(agg=agg, max_response_length=S, clip_low=clip, clip_high=clip)
    den = LOSS_AGGREGATIONS.get(agg).count(keep.double())

    def fn(ts):
        lp = ts.logprob.reshape(B, S)
        loss, metrics = policy_loss(lp, old.to(lp.dtype), adv.to(lp.dtype), keep, ref_logp=ref.to(lp.dtype),
                                    kl_coef=0.1, denominator=den, config=cfg)
        return loss, metrics
    return fn


def _reference(h, w, labels, mask, loss_fn):
    hh = h.detach().double().requires_grad_(True)
    ww = w.detach().double().requires_grad_(True)
    stats = [torch.where(mask, o, torch.zeros_like(o)) for o in reference(hh @ ww.t(), labels, VOCAB, TEMP)[:3]]
    loss, _ = loss_fn(TokenStats(*stats))
    dh, dw = torch.autograd.grad(loss, [hh, ww])
    return loss.detach(), [s.detach() for s in stats], dh, dw


def _run(dtype, backend, loss_fn, chunk_bytes=4 * 60 * 4 * 5):
    h, w, labels, mask = make_inputs(dtype, rows=ROWS)
    h, w = h.requires_grad_(True), w.requires_grad_(True)
    loss, stats, aux = fused_head_loss(h, w, labels, loss_fn, mask=mask, temperature=TEMP,
                                       vocab_size=VOCAB, chunk_bytes=chunk_bytes, backend=backend)
    dh, dw = torch.autograd.grad(loss, [h, w])
    return (h, w, labels, mask), loss, stats, aux, dh, dw


LOSSES = ["linear"] + [f"policy-{a}" for a in LOSS_AGGREGATIONS.names()]


def _loss(name, mask, dtype=torch.float32):
    if name == "linear":
        return linear_loss(_weights())
    return policy(name[len("policy-"):], mask, clip=0.2 if dtype == torch.float32 else 0.99)


# bf16 against float64 with the linear loss only: the policy loss's k3 term (exp(ref - logp)) turns a
# bf16 log-prob's own rounding (~2^-8 of a logit of 100) into a large gradient change; bf16 policy
# losses are checked against ``fused_head`` + autograd in the same dtype below.
CASES = [(torch.float32, name) for name in LOSSES] + [(torch.bfloat16, "linear")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,loss_name", CASES, ids=lambda x: str(x).split(".")[-1])
def test_matches_float64(backend, dtype, loss_name):
    mask = make_inputs(dtype, rows=ROWS)[3]
    loss_fn = _loss(loss_name, mask, dtype)
    (h, w, labels, mask), loss, stats, aux, dh, dw = _run(dtype, backend, loss_fn)
    want_loss, want_stats, want_dh, want_dw = _reference(h, w, labels, mask, loss_fn)
    assert dh.dtype == h.dtype and dw.dtype == w.dtype
    eps = 2e-5 if dtype == torch.float32 else 2 ** -6
    scale = float((h.detach().double() @ w.detach().double().t()).abs().max() / TEMP)
    what = f"{loss_name} {dtype} {backend}"
    for name, got, want in zip(("logprob", "entropy", "self_certainty"), stats, want_stats):
        assert_close(got, want, eps, eps * scale, f"{what} {name}")
    assert_close(loss.reshape(1), want_loss.reshape(1), eps * 10, eps * 10, f"{what} loss")
    for name, got, want in (("d hidden", dh, want_dh), ("d weight", dw, want_dw)):
        tol = (4e-4 if dtype == torch.float32 else 2 ** -4) * float(want.abs().max())
        assert_close(got, want, 0.0, tol, f"{what} {name}")
    assert not bool(dh[~mask].any()), "rows outside the mask got a gradient"
    assert aux is not None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("agg", LOSS_AGGREGATIONS.names())
def test_equals_fused_head_with_autograd(backend, dtype, agg):
    """Same statistics as ``fused_head`` and the gradients that autograd gives through it."""
    mask = make_inputs(dtype, rows=ROWS)[3]
    loss_fn = policy(agg, mask)
    (h, w, labels, mask), loss, stats, _, dh, dw = _run(dtype, backend, loss_fn)
    h2, w2 = h.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    ts = fused_head(h2, w2, labels, mask=mask, temperature=TEMP, vocab_size=VOCAB, chunk_bytes=4 * 60 * 4 * 5,
                    backend=backend)
    for a, b in zip(stats, ts[:3]):
        assert torch.equal(a, b.detach())
    loss2, _ = loss_fn(ts)
    dh2, dw2 = torch.autograd.grad(loss2, [h2, w2])
    assert torch.equal(loss, loss2.detach())
    tol = 1e-6 if dtype == torch.float32 else 2 ** -7  # bf16: products rounded in another order
    for name, a, b in (("d hidden", dh, dh2), ("d weight", dw, dw2)):
        assert_close(a.double(), b.double(), tol, tol * float(b.double().abs().max()), name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunking_does_not_change_results(backend):
    mask = make_inputs(torch.float64, rows=ROWS)[3]
    loss_fn = linear_loss(_weights())
    one = _run(torch.float64, backend, loss_fn, chunk_bytes=1 << 30)
    many = _run(torch.float64, backend, loss_fn, chunk_bytes=1)  # one row per chunk
    for a, b in zip([one[1], one[4], one[5]] + list(one[2]), [many[1], many[4], many[5]] + list(many[2])):
        assert_close(a, b.double(), 1e-12, 1e-12, "one chunk vs one row per chunk")
    del mask


def test_frozen_weight_gets_no_gradient_and_hidden_still_does():
    h, w, labels, mask = make_inputs(torch.float32, rows=ROWS)
    h = h.requires_grad_(True)
    loss, _, _ = fused_head_loss(h, w, labels, linear_loss(_weights()), mask=mask, temperature=TEMP,
                                 vocab_size=VOCAB)
    loss.backward()
    assert h.grad is not None and w.grad is None and bool(h.grad.any())


def test_loss_scaled_by_the_incoming_gradient_and_backward_once():
    h, w, labels, mask = make_inputs(torch.float32, rows=ROWS)

    def d_hidden(scale, twice=False):
        hh = h.clone().requires_grad_(True)
        loss, _, _ = fused_head_loss(hh, w, labels, linear_loss(_weights()), mask=mask, vocab_size=VOCAB)
        (g,) = torch.autograd.grad(scale * loss, [hh], retain_graph=twice)
        if twice:
            torch.autograd.grad(loss, [hh])
        return g

    assert torch.allclose(d_hidden(3.0), 3.0 * d_hidden(1.0))
    with pytest.raises(RuntimeError, match="backward twice"):
        d_hidden(1.0, twice=True)


def test_errors_name_the_problem():
    h, w, labels, mask = make_inputs(torch.float32, rows=ROWS)
    with pytest.raises(ValueError, match="loss_fn must return"):
        fused_head_loss(h, w, labels, lambda ts: (ts.logprob, {}), mask=mask, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="hidden"):
        fused_head_loss(h[:, :H - 1], w, labels, linear_loss(_weights()), vocab_size=VOCAB)
