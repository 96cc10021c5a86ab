"""``token_stats`` unsharded (TP = 1) against the float64 reference, both backends."""
import os

import pytest
import torch

from dualrpo_mcore.ops import TokenStats, load_error, token_stats
from helpers.backends import BACKENDS, HAS_EXT
from helpers.close import assert_close
from helpers.token_stats_ref import IGNORE, awkward_inputs, reference, reference_with_grads, tolerance

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _upstream(rows, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, generator=g, dtype=torch.float64) for _ in range(n)]


def check_against_reference(z, labels, vocab_size, temperature, ref, backend, vocab_start=0,
                            width=None):
    """Run token_stats on the columns [vocab_start, vocab_start + width) and compare with float64."""
    width = z.shape[1] - vocab_start if width is None else width
    shard = z[:, vocab_start:vocab_start + width].clone().requires_grad_(True)
    rshard = None if ref is None else ref[:, vocab_start:vocab_start + width]
    out = token_stats(shard, labels, vocab_start=vocab_start, vocab_size=vocab_size,
                      temperature=temperature, ref_logits=rshard, backend=backend)
    outs = list(out) + ([out.kl] if ref is not None else [])
    up = _upstream(z.shape[0], len(outs))
    want, want_grad = reference_with_grads(z, labels, vocab_size, temperature, ref, up)
    rtol, atol = tolerance(z.dtype, z / temperature)
    for name, g, w in zip(["logprob", "entropy", "self_certainty", "kl"], outs, want):
        assert g.dtype == torch.float32 and g.shape == (z.shape[0],)
        assert_close(g, w, rtol, atol, name)
    (grad,) = torch.autograd.grad(outs, [shard], [u.float() for u in up])
    assert grad.dtype == z.dtype
    grtol = 2e-5 if z.dtype == torch.float32 else 1e-2
    assert_close(grad, want_grad[:, vocab_start:vocab_start + width], grtol, 1e-6 / temperature,
                 "grad")
    return out, grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("with_ref", [False, True], ids=["no-ref", "ref"])
def test_matches_float64(backend, dtype, with_ref):
    z, labels, ref = awkward_inputs(11, 37, 5, dtype)
    check_against_reference(z, labels, 37, 0.7, ref if with_ref else None, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_temperature_one_long_rows(backend):
    # Rows longer than the kernel's tile (several tiles, a ragged last one).
    z, labels, ref = awkward_inputs(7, 1500, 3, torch.float32, seed=3)
    check_against_reference(z, labels, 1500, 1.0, ref, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_logits(backend):
    # A strided view (every other column of a wider buffer) must give the same answer.
    z, labels, ref = awkward_inputs(9, 41, 0, torch.float32, extreme=False)
    wide = torch.zeros(9, 82)
    wide[:, ::2] = z.float()
    view = wide[:, ::2].requires_grad_(False)
    full = view.clone().requires_grad_(True)
    out_view = token_stats(view, labels, ref_logits=ref.float(), backend=backend)
    out = token_stats(full, labels, ref_logits=ref.float(), backend=backend)
    for a, b in zip(list(out_view) + [out_view.kl], list(out) + [out.kl]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_labels_have_zero_logprob_and_no_logprob_gradient(backend):
    z, labels, _ = awkward_inputs(6, 20, 2, torch.float32, extreme=False)
    labels[:] = IGNORE
    zz = z.clone().requires_grad_(True)
    out = token_stats(zz, labels, vocab_size=20, backend=backend)
    assert torch.equal(out.logprob, torch.zeros(6))
    (g,) = torch.autograd.grad(out.logprob.sum(), [zz])
    assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    # float64 end to end: the fallback computes in float64; the C++ kernel instantiates a
    # float64-accumulating version of the same code for double inputs.
    g = torch.Generator().manual_seed(5)
    z = torch.randn(4, 7, generator=g, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(4, 7, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 4, IGNORE, 2])

    def fn(x):
        o = token_stats(x, labels, vocab_size=5, temperature=1.3, ref_logits=ref, backend=backend)
        assert o.logprob.dtype == torch.float64
        return o.logprob, o.entropy, o.self_certainty, o.kl

    assert torch.autograd.gradcheck(fn, (z,), eps=1e-6, atol=1e-7)


def test_result_shape_contract():
    z, labels, ref = awkward_inputs(6, 10, 0, torch.float32, extreme=False)
    lp, h, sc = token_stats(z, labels)  # the 3-field contract unpacks
    out = token_stats(z, labels)
    assert isinstance(out, TokenStats) and out.kl is None and len(out) == 3
    assert out.logprob is out[0] and out.entropy is out[1] and out.self_certainty is out[2]
    assert token_stats(z, labels, ref_logits=ref).kl.shape == (6,)
    assert bool((out.self_certainty >= -1e-6).all()) and bool((out.entropy >= -1e-6).all())


def test_bad_inputs_name_the_problem():
    z = torch.randn(3, 8)
    with pytest.raises(ValueError, match="label 8 at row 1"):
        token_stats(z, torch.tensor([0, 8, 1]))
    with pytest.raises(ValueError, match="temperature"):
        token_stats(z, torch.tensor([0, 1, 1]), temperature=0.0)
    with pytest.raises(ValueError, match="ref_logits"):
        token_stats(z, torch.tensor([0, 1, 1]), ref_logits=torch.randn(3, 7))
    with pytest.raises(ValueError, match="backend"):
        token_stats(z, torch.tensor([0, 1, 1]), backend="cuda-please")


def test_backends_agree_exactly_on_structure():
    # Zero-row input and a row of a single real column.
    for backend in ["torch"] + (["ext"] if HAS_EXT else []):
        out = token_stats(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), backend=backend)
        assert out.logprob.shape == (0,)
        one = token_stats(torch.tensor([[2.0, 5.0]]), torch.tensor([0]), vocab_size=1, backend=backend)
        assert float(one.logprob) == 0.0 and float(one.entropy) == 0.0
        assert float(one.self_certainty) == 0.0


def test_compiled_extension_is_loaded_when_required():
    if os.environ.get("DUALRPO_REQUIRE_EXT") != "1":
        pytest.skip("DUALRPO_REQUIRE_EXT is not 1: the fallback is allowed in this environment")
    assert HAS_EXT, f"DUALRPO_REQUIRE_EXT=1 but dualrpo_mcore._C did not load: {load_error()}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile(backend):
    z, labels, ref = awkward_inputs(5, 16, 2, torch.float32, extreme=False)

    def loss(x):
        o = token_stats(x, labels, vocab_size=16, temperature=0.9, ref_logits=ref, backend=backend)
        return o.logprob.sum() + o.entropy.sum() + o.self_certainty.sum() + o.kl.sum()

    x1 = z.clone().requires_grad_(True)
    x2 = z.clone().requires_grad_(True)
    eager = loss(x1)
    eager.backward()
    compiled = torch.compile(loss, backend="aot_eager")(x2)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(x2.grad, x1.grad)


# --- self-certainty at large offsets (docs/design.md eq. 1: shifted by the row max) ------------------

OFFSETS = [1.4e4, -3e4, 1e6]


def _finite_offsets(dtype):
    return [v for v in OFFSETS if torch.isfinite(torch.tensor(v).to(dtype)).item()]  # fp16 tops at 65504


def _sharded_stats(z, labels, vocab, temperature, bounds, backend):
    """Outputs of the per-shard partials folded by the tensor-parallel merge, on one process."""
    from dualrpo_mcore.ops import _ext
    from dualrpo_mcore.ops.token_stats import merge

    partials, _ = _ext.ops(backend)
    parts = [partials(z[:, a:b], labels, None, a, max(0, min(b, vocab) - a), vocab, 1.0 / temperature)
             for a, b in zip(bounds, bounds[1:])]
    (lp, h, sc, _), _ = merge(torch.stack(parts), labels, vocab)
    return lp, h, sc


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_uniform_rows_have_zero_self_certainty_at_any_offset(backend, dtype, temperature):
    offsets = _finite_offsets(dtype)
    for vocab in (1, 37, 1001, 50000):
        z = torch.tensor(offsets).to(dtype)[:, None].expand(-1, vocab).contiguous()
        labels = torch.zeros(len(offsets), dtype=torch.long)
        sc = token_stats(z, labels, temperature=temperature, backend=backend).self_certainty
        assert torch.equal(sc, torch.zeros_like(sc)), (vocab, sc.tolist())
        bounds = [0, vocab // 3, vocab] if vocab > 2 else [0, vocab]
        _, _, sc = _sharded_stats(z, labels, vocab, temperature, bounds, backend)
        assert torch.equal(sc, torch.zeros_like(sc)), ("sharded", vocab, sc.tolist())


@pytest.mark.parametrize("backend", BACKENDS)
def test_self_certainty_error_does_not_grow_with_the_offset(backend):
    # fp32 logits around a large offset: the inputs are what they are (quantised by the offset,
    # and x = z * (1/T) rounded in fp32, so the reference starts from that x), but the statistic
    # over them must be as accurate as at offset 0; an unshifted mean of x loses ~ulp(sum x) / V,
    # 1e-3 and more at 1e4. Sharded: the shards' maxima differ, so the mean term is re-based in
    # the merge.
    g = torch.Generator().manual_seed(11)
    vocab, temperature = 1000, 0.7
    for offset in OFFSETS:
        z = (offset + torch.randn(4, vocab, generator=g, dtype=torch.float64) * 3).float()
        labels = torch.randint(0, vocab, (4,), generator=g)
        x32 = z * torch.tensor(1.0 / temperature, dtype=torch.float32)
        want = reference(x32, labels, vocab)[2]
        got = token_stats(z, labels, temperature=temperature, backend=backend).self_certainty
        assert float((got.double() - want).abs().max()) < 1e-4, (offset, got, want)
        _, _, got = _sharded_stats(z, labels, vocab, temperature, [0, 333, 700, vocab], backend)
        assert float((got - want).abs().max()) < 1e-4, ("sharded", offset, got, want)
        assert bool((got >= 0).all())
