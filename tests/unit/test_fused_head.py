"""``fused_head`` (output layer + token statistics, chunked) at TP = 1 against float64.

The reference forms the logits ``hidden @ weight.T`` in float64 and applies the float64 definitions
of ``helpers.token_stats_ref``; gradients for hidden and weight come from float64 autograd. Shapes are
awkward on purpose (odd T and H, padding rows in the weight, chunks that do not divide T), with
temperature, ignore labels, a row mask, fp32/bf16/fp16 and both backends (compiled and pure torch).
"""
import pytest
import torch

from dualrpo_mcore.ops import fused_head, load_error
from dualrpo_mcore.ops.fused_head import chunk_rows
from helpers.backends import BACKENDS, HAS_EXT
from helpers.close import assert_close
from helpers.head_ref import H, PAD, TEMP, VOCAB, T, make_inputs, reference_head
from helpers.token_stats_ref import reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
def upstream(n, rows=T, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, generator=g, dtype=torch.float64) for _ in range(n)]


def tolerances(dtype, logits_scale):
    """(rtol, atol) of outputs, and relative tolerance of gradients, for fp32 or half inputs."""
    if dtype == torch.float32:
        return 2e-5, 2e-5 * logits_scale, 2e-4
    if dtype == torch.float64:
        return 1e-10, 1e-10 * logits_scale, 1e-9
    # Half-precision logits are rounded once (as the unfused output layer's are): 2^-8 relative.
    eps = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -11
    return 4 * eps, 4 * eps * logits_scale, 8 * eps


def check(dtype, backend, *, mask=True, with_ref=False, chunk_bytes=None, seed=0):
    h, w, labels, m = make_inputs(dtype, seed)
    m = m if mask else None
    rh = rw = None
    if with_ref:
        rh, rw, _, _ = make_inputs(dtype, seed + 100, hidden=H + 3)
    n_cols = VOCAB + PAD
    # Default: a budget of 5 rows per chunk, so T = 29 is 6 chunks with a ragged last one.
    budget = chunk_bytes or 5 * n_cols * h.element_size() * (2 + int(with_ref) + int(dtype != torch.float32))
    hv, wv = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = fused_head(hv, wv, labels, mask=m, temperature=TEMP, vocab_size=VOCAB, ref_hidden=rh, ref_weight=rw,
                     chunk_bytes=budget, backend=backend)
    outs = list(out) + ([out.kl] if with_ref else [])
    up = upstream(len(outs))
    want, (want_dh, want_dw) = reference_head(h, w, labels, VOCAB, TEMP, m, rh, rw, up)
    # Per row: a logit of size |x| carries a rounding error of |x| times the dtype's epsilon.
    scale = ((h.double() @ w.double().t()).abs().amax(1) / TEMP).clamp(min=1.0)
    rtol, atol, grtol = tolerances(dtype, scale)
    for name, got, ref in zip(["logprob", "entropy", "self_certainty", "kl"], outs, want):
        assert got.dtype == torch.float32 and got.shape == (T,), name
        assert_close(got, ref, rtol, atol, f"{dtype} {backend} {name}")
    dh, dw = torch.autograd.grad(outs, [hv, wv], [u.float() for u in up])
    assert dh.dtype == dtype and dw.dtype == dtype
    assert_close(dh, want_dh, grtol, grtol * float(want_dh.abs().max()), f"{dtype} {backend} d hidden")
    assert_close(dw, want_dw, grtol, grtol * float(want_dw.abs().max()), f"{dtype} {backend} d weight")
    assert torch.equal(dw[VOCAB:], torch.zeros_like(dw[VOCAB:])), "padding rows of the weight got a gradient"
    if m is not None:
        assert torch.equal(dh[~m], torch.zeros_like(dh[~m])), "masked rows got a gradient"
        for o in outs:
            assert torch.equal(o[~m], torch.zeros_like(o[~m])), "masked rows got statistics"
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("with_ref", [False, True], ids=["no-ref", "ref"])
def test_matches_float64(backend, dtype, with_ref):
    check(dtype, backend, with_ref=with_ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_mask_and_one_chunk(backend):
    check(torch.float32, backend, mask=False, chunk_bytes=2**30)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_gradcheck(backend):
    h, w, labels, m = make_inputs(torch.float64, seed=3, rows=6, hidden=5, vocab=9, pad=2)
    h[2] /= 40.0  # keep the finite differences well-conditioned
    hv, wv = h.clone().requires_grad_(True), w.clone().requires_grad_(True)

    def f(a, b):
        out = fused_head(a, b, labels, mask=m, temperature=TEMP, vocab_size=9, chunk_bytes=2 * 11 * 8 * 2,
                         backend=backend)
        return tuple(out)

    assert torch.autograd.gradcheck(f, (hv, wv), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunking_does_not_change_results(backend):
    h, w, labels, _ = make_inputs(torch.float32, seed=7)
    outs = []
    for rows in (1, 4, T):
        budget = rows * (VOCAB + PAD) * 4 * 2
        assert chunk_rows(budget, VOCAB + PAD, torch.float32) == rows
        hv, wv = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        out = fused_head(hv, wv, labels, temperature=TEMP, vocab_size=VOCAB, chunk_bytes=budget, backend=backend)
        grads = torch.autograd.grad(list(out), [hv, wv], [torch.ones(T)] * 3)
        outs.append([o.detach() for o in out] + list(grads))
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_chunk_rows_from_budget():
    # bf16: logits + dz + a dW product block (2 bytes each) per row of 151936 columns.
    assert chunk_rows(256 * 2**20, 151936, torch.bfloat16) == 256 * 2**20 // (151936 * 2 * 3)
    assert chunk_rows(256 * 2**20, 151936, torch.float32, with_ref=True) == 256 * 2**20 // (151936 * 4 * 3)
    assert chunk_rows(1, 151936, torch.float32) == 1
    with pytest.raises(ValueError, match="chunk_bytes must be > 0"):
        chunk_rows(0, 10, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_embedding_gradient_reaches_the_embedding(backend):
    """The head's weight is the input embedding's: its gradient is the sum of both uses."""
    g = torch.Generator().manual_seed(11)
    vocab, hidden, rows = 41, 16, 13
    ids = torch.randint(0, vocab, (rows + 1,), generator=g)
    emb64 = torch.randn(vocab, hidden, generator=g, dtype=torch.float64) * 0.5
    mix64 = torch.randn(hidden, hidden, generator=g, dtype=torch.float64) / hidden ** 0.5
    up = upstream(3, rows, seed=12)

    def model(emb, mix, use_fused):
        x = torch.nn.functional.embedding(ids[:-1], emb)
        h = torch.tanh(x @ mix)
        labels = ids[1:]
        if use_fused:
            out = fused_head(h, emb, labels, temperature=TEMP, chunk_bytes=4 * vocab * 4 * 2, backend=backend)
        else:
            out = reference(h @ emb.t(), labels, vocab, TEMP)[:3]
        return sum((u.to(o.dtype) * o).sum() for u, o in zip(up, out))

    emb = torch.nn.Embedding(vocab, hidden)
    with torch.no_grad():
        emb.weight.copy_(emb64)
    loss = model(emb.weight, mix64.float(), True)
    loss.backward()
    e64 = emb64.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(model(e64, mix64, False), [e64])
    assert emb.weight.grad is not None
    assert_close(emb.weight.grad, want, 2e-4, 2e-4 * float(want.abs().max()), "tied embedding gradient")
    # The head's share is real: with the head's use of the weight cut off, the gradient differs.
    e_in = emb64.clone().requires_grad_(True)
    x = torch.nn.functional.embedding(ids[:-1], e_in)
    out = reference(torch.tanh(x @ mix64) @ emb64.t(), ids[1:], vocab, TEMP)[:3]
    (input_only,) = torch.autograd.grad(sum((u * o).sum() for u, o in zip(up, out)), [e_in])
    assert float((input_only - want).abs().max()) > 100 * 2e-4 * float(want.abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_only_under_no_grad(backend):
    h, w, labels, m = make_inputs(torch.float32, seed=2)
    with torch.no_grad():
        out = fused_head(h, w, labels, mask=m, temperature=TEMP, vocab_size=VOCAB, backend=backend)
    want, _ = reference_head(h, w, labels, VOCAB, TEMP, m)
    scale = float((h.double() @ w.double().t()).abs().max()) / TEMP
    for got, ref in zip(out, want):
        assert not got.requires_grad
        assert_close(got, ref, 2e-5, 2e-5 * scale, "no-grad forward")


def test_errors_name_the_problem():
    h, w, labels, m = make_inputs(torch.float32)
    with pytest.raises(ValueError, match="share a dtype"):
        fused_head(h, w.double(), labels)
    with pytest.raises(ValueError, match="weight \\[V_local, H\\]"):
        fused_head(h, w[:, :5], labels)
    bad = labels.clone()
    bad[6] = VOCAB
    with pytest.raises(ValueError, match=f"label {VOCAB} at row 6"):
        fused_head(h, w, bad, vocab_size=VOCAB)
    fused_head(h, w, bad, vocab_size=VOCAB, mask=m)  # row 6 is masked out: never looked at
    with pytest.raises(ValueError, match="both ref_hidden and ref_weight"):
        fused_head(h, w, labels, ref_hidden=h)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        fused_head(h, w, labels, temperature=0.0)
    with pytest.raises(ValueError, match="mask must be"):
        fused_head(h, w, labels, mask=m[:-1])
    with pytest.raises(ValueError, match="chunk_bytes must be > 0"):
        fused_head(h, w, labels, chunk_bytes=0)


@pytest.mark.skipif(not HAS_EXT, reason=f"compiled extension not built here: {load_error()}")
def test_compiled_operator_refuses_bad_calls():
    h, w, labels, _ = make_inputs(torch.float32)
    with pytest.raises(RuntimeError, match="n_real = 99 outside"):
        torch.ops.dualrpo.head_partials(h, w, labels, None, None, 0, 99, VOCAB, 1.0, 4)
    with pytest.raises(RuntimeError, match="chunk_rows must be > 0"):
        torch.ops.dualrpo.head_partials(h, w, labels, None, None, 0, VOCAB, VOCAB, 1.0, 0)
    with pytest.raises(RuntimeError, match="both ref_hidden and ref_weight"):
        torch.ops.dualrpo.head_partials(h, w, labels, h, None, 0, VOCAB, VOCAB, 1.0, 4)


def test_memory_planner_drops_the_logits_with_fused_head():
    """planner/memory.py: with Layout.fused_head the log-prob buffers hold hidden-sized copies, not
    [tokens, V/TP] logits (and the update's dW), and the transient is one chunk budget plus the fp32 dW
    sum (bf16)."""
    from dualrpo_mcore.planner import memory as M
    from dualrpo_mcore.models.qwen2_5_vl import presets
    from dualrpo_mcore.models.qwen2_5_vl.config import from_hf
    from dualrpo_mcore.ops.fused_head import DEFAULT_CHUNK_BYTES

    cfg = from_hf(presets.hf_config_dict("qwen2.5-vl-7b"))
    mb = M.MicroBatch(rows=4, seq_len=4096)
    tokens, v_local, hidden = 4 * 4096, 152064 // 2, 3584  # 151936 padded to a multiple of 128, TP = 2
    plain = M.logits_bytes(cfg, M.Layout(tp=2, dtype="bf16"), mb)
    fused = M.logits_bytes(cfg, M.Layout(tp=2, dtype="bf16", fused_head=True), mb)
    assert plain["held"] == 2 * tokens * v_local * 2 + tokens * 20
    # hidden rows and dHidden, the stats and labels, and the update's dW held from forward to backward
    assert fused["held"] == 2 * tokens * hidden * 2 + tokens * 20 + v_local * hidden * 2
    assert fused["transient"] == DEFAULT_CHUNK_BYTES + v_local * hidden * 4
    assert fused["held"] * 6 < plain["held"] and fused["transient"] < plain["transient"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_skips_the_weight_gradient(backend, monkeypatch):
    """A frozen weight: d hidden as with a trainable one, and the backward op forms no d weight."""
    import importlib

    fh_module = importlib.import_module("dualrpo_mcore.ops.fused_head")  # the package re-exports the function
    h, w, labels, mask = make_inputs(torch.float32)
    up = [u.float() for u in upstream(3)]

    def d_hidden(weight):
        hh = h.clone().requires_grad_(True)
        outs = fused_head(hh, weight, labels, mask=mask, temperature=TEMP, vocab_size=VOCAB, backend=backend)
        return torch.autograd.grad(list(outs[:3]), [hh], up)[0]

    want = d_hidden(w.clone().requires_grad_(True))
    real_ops, seen = fh_module._ops, []

    def spying_ops(chosen):
        partials_op, grad_op = real_ops(chosen)

        def spy(*a):
            dh, dw = grad_op(*a)
            seen.append(dw.numel())
            return dh, dw
        return partials_op, spy

    monkeypatch.setattr(fh_module, "_ops", spying_ops)
    got = d_hidden(w)
    assert seen == [0] and w.grad is None
    assert torch.equal(got, want)
