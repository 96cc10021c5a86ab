"""Policy loss (eq. 5): values, hand-derived gradients, clip/TIS/KL metrics vs float64 loop references."""
import math

import numpy as np
import pytest
import torch

from dualrpo_mcore.algo import LOSS_AGGREGATIONS, PolicyLossConfig, policy_loss


def ref_loss_and_grad(lp, old, adv, mask, *, lo=0.2, hi=0.2, dual=None, agg="token-mean", length=None,
                      ref=None, beta=None, roll=None, cap=None, denominator=None):
    """Per-token objective written out branch by branch; d loss / d lp derived by hand."""
    B, T = lp.shape
    per, dper = np.zeros((B, T)), np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            r, a = math.exp(lp[b, t] - old[b, t]), adv[b, t]
            clipped_r = min(max(r, 1 - lo), 1 + hi)
            obj = min(r * a, clipped_r * a)
            # gradient flows through the unclipped branch when it is the one min() picks
            g = a * r if (1 - lo <= r <= 1 + hi or r * a < clipped_r * a) else 0.0
            if dual is not None and a < 0 and obj < dual * a:
                obj, g = dual * a, 0.0
            w = min(math.exp(old[b, t] - roll[b, t]), cap) if cap is not None else 1.0
            per[b, t], dper[b, t] = -obj * w, -g * w
            if ref is not None:
                d = ref[b, t] - lp[b, t]
                per[b, t] += beta[b, t] * (math.exp(d) - d - 1)
                dper[b, t] += beta[b, t] * (1 - math.exp(d))
    weight = np.zeros((B, T))
    counts = mask.sum(1)
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            if agg == "token-mean":
                weight[b, t] = 1.0 / (denominator or mask.sum())
            elif agg == "seq-mean":
                weight[b, t] = 1.0 / counts[b] / (denominator or (counts > 0).sum())
            else:
                weight[b, t] = 1.0 / length / (denominator or (counts > 0).sum())
    return float((weight * per).sum()), weight * dper


def make_batch(seed, B=5, T=7, spread=0.6):
    rng = np.random.default_rng(seed)
    old = -rng.uniform(0.05, 4.0, (B, T))
    lp = old + rng.uniform(-spread, spread, (B, T))
    adv_seq = rng.normal(size=B)
    adv_seq[1] = 0.0
    mask = (rng.uniform(size=(B, T)) < 0.75).astype(np.int64)
    mask[0, 0] = 1
    mask[2] = 0  # empty response
    mask[3, 0] = 1
    return lp, old, adv_seq, mask, rng


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


def test_aggregation_registry():
    assert LOSS_AGGREGATIONS.names() == ["seq-mean", "seq-mean-token-sum-norm", "token-mean"]


CASES = [
    dict(),
    dict(lo=0.2, hi=0.28),
    dict(lo=0.1, hi=0.3, dual=1.3),
    dict(cap=1.2),
    dict(kl="seq"),
    dict(kl="tok", lo=0.15, hi=0.25, dual=1.4, cap=1.1),
]


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_loss_and_gradient_match_reference(agg, case):
    spec = dict(CASES[case])
    lp, old, adv_seq, mask, rng = make_batch(seed=case)
    adv = np.repeat(adv_seq[:, None], lp.shape[1], axis=1)
    roll = old + rng.uniform(-0.3, 0.3, lp.shape) if "cap" in spec else None
    kl = spec.pop("kl", None)
    ref = beta = None
    if kl is not None:
        ref = old + rng.uniform(-0.5, 0.5, lp.shape)
        beta_seq = rng.uniform(0.0, 0.3, lp.shape[0])
        beta = np.repeat(beta_seq[:, None], lp.shape[1], axis=1) if kl == "seq" else rng.uniform(0, 0.3, lp.shape)
    length = 11 if agg == "seq-mean-token-sum-norm" else None
    want, want_grad = ref_loss_and_grad(lp, old, adv, mask, agg=agg, length=length, ref=ref, beta=beta,
                                        roll=roll, **spec)
    logp = _t(lp).requires_grad_(True)
    kwargs = dict(clip_low=spec.get("lo", 0.2), clip_high=spec.get("hi", 0.2), dual_clip=spec.get("dual"),
                  tis_cap=spec.get("cap"), agg=agg, max_response_length=length)
    loss, metrics = policy_loss(
        logp, _t(old), _t(adv_seq), _t(mask), ref_logp=None if ref is None else _t(ref),
        kl_coef=None if beta is None else _t(beta_seq if kl == "seq" else beta),
        rollout_logp=None if roll is None else _t(roll), **kwargs)
    loss.backward()
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(want, rel=1e-10, abs=1e-12)
    np.testing.assert_allclose(logp.grad.numpy(), want_grad, rtol=1e-9, atol=1e-12)
    assert all(v.dim() == 0 and not v.requires_grad for v in metrics.values())


def test_gradient_reference_sees_every_branch():
    # Guard for the test above: the random cases really exercise clipped, unclipped and dual tokens.
    lp, old, adv_seq, mask, _ = make_batch(seed=2)
    adv = np.repeat(adv_seq[:, None], lp.shape[1], axis=1)
    _, grad = ref_loss_and_grad(lp, old, adv, mask, lo=0.1, hi=0.3, dual=1.3)
    r = np.exp(lp - old)
    m = mask.astype(bool)
    assert (grad[m] == 0).any() and (grad[m] != 0).any()
    assert ((adv < 0) & (r > 1.3) & m).any() and ((adv > 0) & (r > 1.3) & m).any()


def constructed():
    """One sequence, tokens whose clip status is known by construction (clip_low .2, clip_high .28, dual 3)."""
    adv = torch.tensor([[1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0, 0.0, 1.0]], dtype=torch.float64)
    ratio = torch.tensor([[1.5, 1.25, 0.5, 0.7, 0.85, 1.5, 5.0, 2.0, 10.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 0]])
    old = torch.full_like(ratio, -2.0)
    return old + ratio.log(), old, adv, mask


def test_clip_fractions_on_constructed_tokens():
    lp, old, adv, mask = constructed()
    logp = lp.clone().requires_grad_(True)
    loss, m = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    # token 0: A>0, r 1.5 > 1.28 -> high; token 3: A<0, r 0.7 < 0.8 -> low; token 6: A<0, r 5 > 3 -> dual
    assert m["clip_frac_high"].item() == pytest.approx(1 / 8)
    assert m["clip_frac_low"].item() == pytest.approx(1 / 8)
    assert m["clip_frac"].item() == pytest.approx(2 / 8)
    assert m["dual_clip_frac"].item() == pytest.approx(1 / 8)
    assert m["ratio_min"].item() == pytest.approx(0.5) and m["ratio_max"].item() == pytest.approx(5.0)
    assert m["ratio_mean"].item() == pytest.approx((1.5 + 1.25 + 0.5 + 0.7 + 0.85 + 1.5 + 5.0 + 2.0) / 8)
    # per-token losses: -min(rA, clip(r)A), dual-capped at -A*3 for token 6
    per = [-1.28, -1.25, -0.5, 0.8, 0.85, 1.5, 3.0, 0.0]
    assert loss.item() == pytest.approx(sum(per) / 8)
    loss.backward()
    r = [1.5, 1.25, 0.5, 0.7, 0.85, 1.5, 5.0, 2.0, 10.0]
    a = [1, 1, 1, -1, -1, -1, -1, 0, 1]
    live = [False, True, True, False, True, True, False, True, False]
    want = [-a[i] * r[i] / 8 if live[i] else 0.0 for i in range(9)]
    np.testing.assert_allclose(logp.grad[0].numpy(), want, atol=1e-12)


def test_dual_clip_bounds_negative_advantage_loss():
    for ratio in (3.5, 20.0, 1e6):
        lp = torch.tensor([[math.log(ratio)]], dtype=torch.float64, requires_grad=True)
        adv = torch.tensor([-2.0], dtype=torch.float64)
        loss, _ = policy_loss(lp, torch.zeros(1, 1, dtype=torch.float64), adv, torch.ones(1, 1), dual_clip=3.0)
        assert loss.item() == pytest.approx(2.0 * 3.0)
        loss.backward()
        assert lp.grad.item() == 0.0
    unbounded, _ = policy_loss(torch.tensor([[math.log(20.0)]]), torch.zeros(1, 1), torch.tensor([-2.0]),
                               torch.ones(1, 1))
    assert unbounded.item() == pytest.approx(40.0)


def test_tis_weights_and_truncation():
    logp = torch.full((1, 4), -1.0, dtype=torch.float64, requires_grad=True)
    old = logp.detach().clone()
    roll = old - torch.tensor([[0.0, math.log(2.0), math.log(5.0), -math.log(2.0)]], dtype=torch.float64)
    adv = torch.tensor([[1.0, -1.0, 2.0, 1.0]], dtype=torch.float64)
    loss, m = policy_loss(logp, old, adv, torch.ones(1, 4), rollout_logp=roll, tis_cap=3.0)
    w = [1.0, 2.0, 3.0, 0.5]
    assert m["tis_weight_mean"].item() == pytest.approx(sum(w) / 4)
    assert m["tis_trunc_frac"].item() == pytest.approx(1 / 4)
    assert m["rollout_logp_absdiff"].item() == pytest.approx((math.log(2) + math.log(5) + math.log(2)) / 4)
    assert loss.item() == pytest.approx(-(1 * 1 - 2 * 1 + 3 * 2 + 0.5 * 1) / 4)
    loss.backward()
    np.testing.assert_allclose(logp.grad[0].numpy(), [-a * wi / 4 for a, wi in zip([1, -1, 2, 1], w)])


def test_ratio_one_without_kl_is_minus_mean_advantage():
    lp, old, adv_seq, mask, _ = make_batch(seed=5)
    loss, m = policy_loss(_t(old), _t(old), _t(adv_seq), _t(mask))
    counts = mask.sum(1)
    assert loss.item() == pytest.approx(-(adv_seq * counts).sum() / counts.sum(), rel=1e-12)
    assert m["clip_frac"].item() == 0.0 and m["approx_kl"].item() == 0.0 and m["ratio_mean"].item() == 1.0


def test_kl_metrics_and_approx_kl_definition():
    lp, old, adv_seq, mask, rng = make_batch(seed=6)
    ref = old + rng.uniform(-0.5, 0.5, lp.shape)
    beta = rng.uniform(0, 0.2, lp.shape[0])
    _, m = policy_loss(_t(lp), _t(old), _t(adv_seq), _t(mask), ref_logp=_t(ref), kl_coef=_t(beta))
    sel = mask.astype(bool)
    k3 = np.exp(ref - lp) - (ref - lp) - 1
    assert m["kl_mean"].item() == pytest.approx(k3[sel].mean(), rel=1e-10)
    assert m["beta_mean"].item() == pytest.approx(np.repeat(beta[:, None], lp.shape[1], 1)[sel].mean(), rel=1e-10)
    d = lp - old  # k3 of KL(pi_old || pi) on tokens drawn from pi_old
    assert m["approx_kl"].item() == pytest.approx((np.exp(d) - d - 1)[sel].mean(), rel=1e-10)


def test_kl_options_reach_the_estimator():
    lp = torch.tensor([[0.0, -1.0]], dtype=torch.float64)
    ref = torch.tensor([[-40.0, 5.0]], dtype=torch.float64)
    cfg = PolicyLossConfig(kl_estimator="k3_clamped", kl_options={"clamp": (-1.0, 1.0)})
    _, m = policy_loss(lp, lp, torch.zeros(1), torch.ones(1, 2), ref_logp=ref, kl_coef=1.0, config=cfg)
    assert m["kl_mean"].item() == pytest.approx(((math.exp(-1) + 1 - 1) + (math.exp(1) - 1 - 1)) / 2)


def test_denominator_override_and_empty_mask():
    lp, old, adv_seq, mask, _ = make_batch(seed=7)
    base, _ = policy_loss(_t(lp), _t(old), _t(adv_seq), _t(mask))
    scaled, _ = policy_loss(_t(lp), _t(old), _t(adv_seq), _t(mask), denominator=1000.0)
    assert scaled.item() == pytest.approx(base.item() * mask.sum() / 1000.0, rel=1e-12)
    logp = _t(lp).requires_grad_(True)
    for agg in LOSS_AGGREGATIONS.names():
        loss, m = policy_loss(logp, _t(old), _t(adv_seq), torch.zeros(lp.shape), agg=agg, max_response_length=7)
        assert loss.item() == 0.0 and all(v.item() == 0.0 for v in m.values())
        loss.backward()
        assert torch.equal(logp.grad, torch.zeros_like(logp))


def test_padding_garbage_does_not_reach_loss_or_gradient():
    lp, old, adv_seq, mask, _ = make_batch(seed=8)
    dirty_lp, dirty_old = lp.copy(), old.copy()
    dirty_lp[mask == 0] = -np.inf
    dirty_old[mask == 0] = np.nan
    clean, _ = policy_loss(_t(lp), _t(old), _t(adv_seq), _t(mask))
    logp = _t(dirty_lp).requires_grad_(True)
    dirty, m = policy_loss(logp, _t(dirty_old), _t(adv_seq), _t(mask))
    dirty.backward()
    assert dirty.item() == pytest.approx(clean.item(), rel=1e-12)
    assert torch.isfinite(logp.grad).all() and all(torch.isfinite(v) for v in m.values())


def test_bf16_inputs_upcast_to_float32():
    lp, old, adv_seq, mask, _ = make_batch(seed=9)
    lp16, old16 = _t(lp).bfloat16(), _t(old).bfloat16()
    loss, _ = policy_loss(lp16, old16, _t(adv_seq).float(), _t(mask))
    assert loss.dtype == torch.float32
    adv = np.repeat(adv_seq[:, None], lp.shape[1], axis=1)
    want, _ = ref_loss_and_grad(lp16.double().numpy(), old16.double().numpy(), adv, mask)
    assert loss.item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    loose, _ = ref_loss_and_grad(lp, old, adv, mask)
    assert loss.item() == pytest.approx(loose, abs=5e-2)


def test_per_token_advantages_and_leading_dims():
    lp, old, adv_seq, mask, rng = make_batch(seed=10, B=4, T=5)
    adv_tok = rng.normal(size=lp.shape)
    want, _ = ref_loss_and_grad(lp, old, adv_tok, mask, agg="seq-mean")
    loss, _ = policy_loss(_t(lp).view(2, 2, 5), _t(old).view(2, 2, 5), _t(adv_tok).view(2, 2, 5),
                          _t(mask).view(2, 2, 5), agg="seq-mean")
    assert loss.item() == pytest.approx(want, rel=1e-10)


def test_input_errors():
    z, one = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="old_logp has shape"):
        policy_loss(z, torch.zeros(2, 4), torch.zeros(2), one)
    with pytest.raises(ValueError, match="both ref_logp and kl_coef"):
        policy_loss(z, z, torch.zeros(2), one, kl_coef=0.1)
    with pytest.raises(ValueError, match="rollout_logp was not given"):
        policy_loss(z, z, torch.zeros(2), one, tis_cap=2.0)
    with pytest.raises(ValueError, match="advantages has shape"):
        policy_loss(z, z, torch.zeros(3), one)
    with pytest.raises(TypeError, match="not both"):
        policy_loss(z, z, torch.zeros(2), one, config=PolicyLossConfig(), clip_low=0.1)
    with pytest.raises(TypeError):
        policy_loss(z, z, torch.zeros(2), one, clip_lo=0.1)


@pytest.mark.parametrize("field,value", [("clip_low", 1.0), ("clip_low", -0.1), ("clip_high", -0.1),
                                         ("dual_clip", 1.0), ("agg", "mean"), ("max_response_length", 0),
                                         ("response_budget", 0),
                                         ("kl_estimator", "k9"), ("tis_cap", 0.0), ("log_ratio_clamp", 0.0)])
def test_config_checks(field, value):
    with pytest.raises(ValueError, match=f"actor.loss.{field}"):
        PolicyLossConfig(**{field: value})
