"""KL estimators, beta(c) (eq. 4) and the certainty normalisers against float64 references."""
import io
import math
import statistics

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dualrpo_mcore.algo import (CERTAINTY_NORMALIZERS, DEFAULT_NORMALIZER, KL_ESTIMATORS, BatchMinMaxNormalizer,
                                RunningNormalizer, kl_coefficient, kl_penalty, make_normalizer)

REF_KL = {
    "k1": lambda lp, ref: lp - ref,
    "k2": lambda lp, ref: 0.5 * (ref - lp) ** 2,
    "k3": lambda lp, ref: math.exp(ref - lp) - (ref - lp) - 1,
    "k3_clamped": lambda lp, ref: math.exp(min(max(ref - lp, -10), 10)) - min(max(ref - lp, -10), 10) - 1,
}


def test_kl_registry_names():
    assert KL_ESTIMATORS.names() == ["k1", "k2", "k3", "k3_clamped"]


@pytest.mark.parametrize("name", sorted(REF_KL))
def test_kl_estimators_match_reference(name):
    gen = torch.Generator().manual_seed(11)
    lp = -torch.rand(4, 7, generator=gen, dtype=torch.float64) * 6
    ref = -torch.rand(4, 7, generator=gen, dtype=torch.float64) * 6
    lp[0, 0], ref[0, 0] = -25.0, -0.5  # log-ratio 24.5: outside the clamp
    lp[0, 1], ref[0, 1] = -0.1, -30.0  # log-ratio -29.9
    got = kl_penalty(lp, ref, name)
    want = [[REF_KL[name](a, b) for a, b in zip(ra, rb)] for ra, rb in zip(lp.tolist(), ref.tolist())]
    assert got.tolist() == [pytest.approx(row, rel=1e-12, abs=1e-14) for row in want]


def test_k3_clamped_range_option_and_finite_gradient():
    lp = torch.tensor([-200.0, -1.0, 0.0], requires_grad=True)
    ref = torch.tensor([0.0, -1.5, -300.0])
    out = kl_penalty(lp, ref, "k3_clamped", clamp=(-2.0, 3.0))
    d = [3.0, -0.5, -2.0]
    assert out.tolist() == pytest.approx([math.exp(x) - x - 1 for x in d], rel=1e-6)
    out.sum().backward()
    # inside the range d k3/d logp = 1 - exp(d); clamped tokens get 0
    assert lp.grad.tolist() == pytest.approx([0.0, 1 - math.exp(-0.5), 0.0], abs=1e-6)
    with pytest.raises(ValueError, match="lo < hi"):
        kl_penalty(lp, ref, "k3_clamped", clamp=(1.0, 1.0))
    with pytest.raises(ValueError, match="must match"):
        kl_penalty(torch.zeros(2), torch.zeros(3), "k3")
    with pytest.raises(KeyError, match="kl_estimator 'k4'"):
        kl_penalty(lp, ref, "k4")


@settings(max_examples=60, deadline=None)
@given(st.floats(-20, 20), st.floats(-20, 20))
def test_k2_k3_nonnegative(lp, ref):
    t = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    for name in ("k2", "k3", "k3_clamped"):
        assert kl_penalty(t(lp), t(ref), name).item() >= 0.0


def test_kl_coefficient_matches_eq4():
    c = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    got = kl_coefficient(c, beta0=0.04, beta_min=0.1)
    assert got.dtype == torch.float64
    assert got.tolist() == pytest.approx([0.04 * (0.1 + 0.9 * (1 - x)) for x in c.tolist()], rel=1e-14)
    assert kl_coefficient(torch.rand(3), beta0=0.0).tolist() == [0.0, 0.0, 0.0]
    assert kl_coefficient(0.5, 1.0).item() == pytest.approx(0.05 + 0.95 * 0.5)


def test_kl_coefficient_errors():
    with pytest.raises(ValueError, match=r"c\[1\] = 1.5"):
        kl_coefficient(torch.tensor([0.0, 1.5]), 0.1)
    with pytest.raises(ValueError, match="c\\[0\\]"):
        kl_coefficient(torch.tensor([float("nan")]), 0.1)
    with pytest.raises(ValueError, match="beta0"):
        kl_coefficient(torch.tensor([0.5]), -0.1)
    with pytest.raises(ValueError, match="beta_min"):
        kl_coefficient(torch.tensor([0.5]), 0.1, beta_min=1.5)


@settings(max_examples=80, deadline=None)
@given(c1=st.floats(0, 1), c2=st.floats(0, 1), beta0=st.floats(0, 10), beta_min=st.floats(0, 1))
def test_kl_coefficient_bounds_and_monotone(c1, c2, beta0, beta_min):
    assume(c1 <= c2)
    b1, b2 = kl_coefficient(torch.tensor([c1, c2], dtype=torch.float64), beta0, beta_min).tolist()
    slack = 1e-12 * max(1.0, beta0)
    for b in (b1, b2):
        assert beta0 * beta_min - slack <= b <= beta0 + slack
    assert b1 >= b2 - slack


# ---------------------------------------------------------------- normalisers


def test_normalizer_registry_and_default():
    assert CERTAINTY_NORMALIZERS.names() == ["batch_minmax", "running"]
    assert DEFAULT_NORMALIZER == "running"
    assert isinstance(make_normalizer(), RunningNormalizer)
    assert isinstance(make_normalizer("batch_minmax", flat_value=0.0), BatchMinMaxNormalizer)
    with pytest.raises(KeyError, match="certainty normaliser 'zscore'"):
        make_normalizer("zscore")


def test_batch_minmax_reference_and_flat():
    u = [0.3, 1.7, 0.9, 0.3, 2.5]
    lo, hi = min(u), max(u)
    got = BatchMinMaxNormalizer()(torch.tensor(u, dtype=torch.float64))
    assert got.tolist() == pytest.approx([(x - lo) / (hi - lo) for x in u], rel=1e-14)
    assert got.min().item() == 0.0 and got.max().item() == 1.0
    assert BatchMinMaxNormalizer()(torch.full((4,), 0.7)).tolist() == [0.5] * 4
    assert BatchMinMaxNormalizer(flat_value=1.0)(torch.full((2,), 0.7)).tolist() == [1.0, 1.0]
    assert BatchMinMaxNormalizer().state_dict() == {}
    with pytest.raises(ValueError, match=r"u\[1\] is not finite"):
        BatchMinMaxNormalizer()(torch.tensor([0.0, float("inf")]))


def ref_running(batches, decay, eps, temperature):
    """EMA of batch mean/variance as a two-component mixture; returns c of the last batch."""
    mean = var = None
    for b in batches:
        bm, bv = statistics.fmean(b), statistics.pvariance(b)
        if mean is None:
            mean, var = bm, bv
        else:
            mix_mean = decay * mean + (1 - decay) * bm
            # E[x^2] of the mixture minus its squared mean
            second = decay * (var + mean ** 2) + (1 - decay) * (bv + bm ** 2)
            mean, var = mix_mean, second - mix_mean ** 2
    sd = math.sqrt(var + eps) * temperature
    return [1 / (1 + math.exp(-(x - mean) / sd)) for x in batches[-1]], mean, var


def test_running_normalizer_matches_reference():
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.rand(6, generator=gen, dtype=torch.float64) * (k + 1) + k).tolist() for k in range(5)]
    norm = RunningNormalizer(decay=0.8, eps=1e-6, temperature=1.5)
    for b in batches:
        got = norm(torch.tensor(b, dtype=torch.float64))
    want, mean, var = ref_running(batches, 0.8, 1e-6, 1.5)
    assert got.tolist() == pytest.approx(want, rel=1e-10)
    assert norm.mean == pytest.approx(mean, rel=1e-12) and norm.var == pytest.approx(var, rel=1e-10)
    assert ((got > 0) & (got < 1)).all()


def test_running_normalizer_state_roundtrip_resumes_exactly():
    gen = torch.Generator().manual_seed(9)
    data = [torch.rand(8, generator=gen) * 3 for _ in range(6)]
    straight = RunningNormalizer(decay=0.7)
    outs = [straight(u) for u in data]
    first = RunningNormalizer(decay=0.7)
    for u in data[:3]:
        first(u)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = RunningNormalizer(decay=0.7)
    resumed.load_state_dict(torch.load(buf))
    for u, want in zip(data[3:], outs[3:]):
        assert torch.equal(resumed(u), want)
    with pytest.raises(KeyError, match="missing"):
        RunningNormalizer().load_state_dict({"mean": 0.0})


def test_running_normalizer_flat_and_edge_cases():
    norm = RunningNormalizer()
    assert norm(torch.full((3,), 2.0)).tolist() == [0.5, 0.5, 0.5]
    with pytest.raises(RuntimeError, match="before any update"):
        RunningNormalizer().normalize(torch.ones(2))
    assert norm(torch.zeros(0)).numel() == 0 and norm.steps == 1
    norm.update_moments(4.0, 1.0)  # e.g. all-reduced over ranks
    assert norm.mean == pytest.approx(0.9 * 2.0 + 0.1 * 4.0)
    for kwargs in ({"decay": 1.0}, {"eps": 0.0}, {"temperature": -1.0}):
        with pytest.raises(ValueError):
            RunningNormalizer(**kwargs)
    with pytest.raises(ValueError, match="var >= 0"):
        norm.update_moments(0.0, -1.0)
