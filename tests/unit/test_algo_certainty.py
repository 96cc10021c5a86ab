"""Self-certainty (eq. 1) and masked means against float64 references written with math/numpy."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dualrpo_mcore.algo import masked_mean, self_certainty, token_self_certainty


def ref_token_sc(row) -> float:
    """sc = logsumexp(z) - mean(z) - log V, textbook form, float64, one row at a time."""
    z = [float(x) for x in row]
    m = max(z)
    lse = m + math.log(sum(math.exp(x - m) for x in z))
    return lse - sum(z) / len(z) - math.log(len(z))


def ref_self_certainty(logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
    lead = logits.shape[:-2]
    out = np.zeros(lead, dtype=np.float64)
    for idx in np.ndindex(*lead):
        vals = [ref_token_sc(logits[idx][t]) for t in range(logits.shape[-2]) if mask[idx][t]]
        out[idx] = sum(vals) / len(vals) if vals else 0.0
    return out


def _random_case(gen, lead, t, v, scale=3.0):
    logits = torch.randn(*lead, t, v, generator=gen, dtype=torch.float64) * scale
    mask = (torch.rand(*lead, t, generator=gen) < 0.7).to(torch.int64)
    mask.view(-1, t)[0] = 0  # always one all-masked (empty) response
    return logits, mask


@pytest.mark.parametrize("lead,t,v", [((3,), 5, 7), ((2, 3), 4, 11), ((4,), 1, 5), ((2,), 6, 1),
                                      ((5,), 3, 2), ((1,), 9, 33)])
def test_self_certainty_matches_float64_reference(lead, t, v):
    gen = torch.Generator().manual_seed(t * 100 + v)
    logits, mask = _random_case(gen, lead, t, v)
    got = self_certainty(logits, mask)
    assert got.dtype == torch.float64 and got.shape == lead
    np.testing.assert_allclose(got.numpy(), ref_self_certainty(logits.numpy(), mask.numpy()), rtol=1e-10, atol=1e-12)
    got32 = self_certainty(logits.float(), mask.bool())
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.numpy(), ref_self_certainty(logits.numpy(), mask.numpy()), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_upcast(dtype):
    gen = torch.Generator().manual_seed(7)
    logits, mask = _random_case(gen, (4,), 6, 13)
    low = logits.to(dtype)
    got = self_certainty(low, mask)
    assert got.dtype == torch.float32
    # Against the exact values it saw: only float32 arithmetic error.
    exact = ref_self_certainty(low.double().numpy(), mask.numpy())
    np.testing.assert_allclose(got.numpy(), exact, rtol=1e-5, atol=2e-6)
    # Against the unrounded float64 logits: the 8-bit (bf16) mantissa of |z| ~ 3 costs ~1e-2.
    np.testing.assert_allclose(got.numpy(), ref_self_certainty(logits.numpy(), mask.numpy()), atol=5e-2)


def test_mask_none_means_every_token_and_empty_is_zero():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 6, generator=gen, dtype=torch.float64)
    full = ref_self_certainty(logits.numpy(), np.ones((2, 4), dtype=bool))
    np.testing.assert_allclose(self_certainty(logits).numpy(), full, rtol=1e-12)
    assert torch.equal(self_certainty(logits, torch.zeros(2, 4)), torch.zeros(2, dtype=torch.float64))


def test_token_self_certainty_temperature_and_vocab_padding():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 9, generator=gen, dtype=torch.float64)
    padded = torch.cat([logits, torch.full((5, 3), 50.0, dtype=torch.float64)], dim=-1)
    got = token_self_certainty(padded, temperature=0.7, vocab_size=9)
    ref = [ref_token_sc(row / 0.7) for row in logits.numpy()]
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12)


def test_gradient_is_softmax_minus_uniform():
    # d sc / d z_j = p_j - 1/V, derived by hand from lse - mean.
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    token_self_certainty(logits).sum().backward()
    z = logits.detach().numpy()
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(logits.grad.numpy(), p - 1.0 / 7, atol=1e-12)


def test_padding_garbage_does_not_leak():
    logits = torch.randn(2, 3, 4, dtype=torch.float64)
    logits[0, 2] = float("nan")
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    got = self_certainty(logits, mask)
    assert torch.isfinite(got).all()
    np.testing.assert_allclose(got[0].item(), ref_self_certainty(logits[:1, :2].numpy(), np.ones((1, 2)))[0])


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="mask shape"):
        self_certainty(torch.randn(2, 3, 4), torch.ones(2, 4))
    with pytest.raises(ValueError, match="logits"):
        self_certainty(torch.randn(4))
    with pytest.raises(ValueError, match="V >= 1"):
        token_self_certainty(torch.randn(3, 0))
    with pytest.raises(ValueError, match="vocab_size"):
        token_self_certainty(torch.randn(3, 4), vocab_size=5)
    with pytest.raises(ValueError, match="temperature"):
        token_self_certainty(torch.randn(3, 4), temperature=0.0)


def test_masked_mean_reference_and_empty():
    x = torch.tensor([[1.0, 2.0, float("inf")], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]], dtype=torch.float64)
    m = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 1]])
    assert masked_mean(x, m, dim=-1).tolist() == [1.5, 0.0, 8.0]
    assert masked_mean(x, m).item() == pytest.approx((1 + 2 + 7 + 9) / 4)
    assert masked_mean(x, torch.zeros_like(m), empty_value=-1.0).item() == -1.0


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, max_side=12),
                  elements=st.floats(-1e4, 1e4, width=32)))
def test_nonnegative_and_finite_property(z):
    sc = token_self_certainty(torch.from_numpy(z))
    assert torch.isfinite(sc).all()
    assert (sc >= -1e-6).all(), sc.min()


@settings(max_examples=30, deadline=None)
@given(st.floats(-1e4, 1e4, width=32), st.integers(1, 64), st.sampled_from([torch.float32, torch.bfloat16]))
def test_uniform_rows_are_exactly_zero(value, v, dtype):
    sc = token_self_certainty(torch.full((3, v), value, dtype=dtype))
    assert torch.equal(sc, torch.zeros(3))


def test_extreme_logits_stay_finite():
    z = torch.tensor([[1e4, -1e4, 0.0, 3.0], [-1e4, -1e4, -1e4, -1e4 + 1]], dtype=torch.float32)
    sc = token_self_certainty(z)
    ref = [ref_token_sc(row) for row in z.double().numpy()]
    assert torch.isfinite(sc).all()
    np.testing.assert_allclose(sc.numpy(), ref, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_uniform_rows_are_zero_at_large_offsets(dtype, temperature):
    # Shifted by the row max (docs/design.md eq. 1): the offset cancels exactly, wherever it is finite.
    for value in (1.4e4, -3e4, 1e6):
        z = torch.full((2, 1001), value).to(dtype)
        if not torch.isfinite(z).all():
            continue  # 1e6 overflows fp16
        sc = token_self_certainty(z, temperature=temperature)
        assert torch.equal(sc, torch.zeros_like(sc)), (value, sc)
