"""Reward shaping (eq. 2) and group advantages (eq. 3) against float64 loop references."""
import math
import statistics

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dualrpo_mcore.algo import (ADVANTAGE_ESTIMATORS, REWARD_MODES, broadcast_to_tokens, group_advantages,
                                shape_rewards)


def ref_shaped(v, u, mu, lam, mode):
    table = {"grpo": lambda a, b: a, "internal": lambda a, b: b,
             "dualrpo": lambda a, b: a * (1 + mu * b) - lam * (1 - a) * b}
    return [table[mode](a, b) for a, b in zip(v, u)]


def ref_advantages(rewards, g, eps, estimator):
    out = []
    for k in range(0, len(rewards), g):
        grp = [float(x) for x in rewards[k:k + g]]
        mean = math.fsum(grp) / g
        if estimator == "grpo":
            sd = statistics.stdev(grp)  # unbiased (n - 1), the documented choice
            out += [(x - mean) / (sd + eps) for x in grp]
        elif estimator == "drgrpo":
            out += [x - mean for x in grp]
        else:
            out += [x - math.fsum(grp[:i] + grp[i + 1:]) / (g - 1) for i, x in enumerate(grp)]
    return out


def test_registries_hold_the_documented_variants():
    assert REWARD_MODES.names() == ["dualrpo", "grpo", "internal"]
    assert ADVANTAGE_ESTIMATORS.names() == ["drgrpo", "grpo", "rloo"]


@pytest.mark.parametrize("mode", ["grpo", "dualrpo", "internal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_rewards_matches_reference(mode, dtype):
    gen = torch.Generator().manual_seed(1)
    v = torch.rand(17, generator=gen, dtype=torch.float64)
    v[:4] = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    u = torch.rand(17, generator=gen, dtype=torch.float64) * 5
    got = shape_rewards(v.to(dtype), u.to(dtype), mu=0.3, lam=0.2, mode=mode)
    assert got.dtype == dtype and got.shape == v.shape
    ref = ref_shaped(v.to(dtype).double().tolist(), u.to(dtype).double().tolist(), 0.3, 0.2, mode)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert got.double().tolist() == pytest.approx(ref, rel=tol, abs=tol)


def test_shape_rewards_defaults_and_dtype_promotion():
    got = shape_rewards(torch.tensor([1, 0]), torch.tensor([2.0, 2.0], dtype=torch.float64))
    assert got.dtype == torch.float64
    assert got.tolist() == pytest.approx([1 * (1 + 0.01 * 2), -0.005 * 2], abs=1e-15)
    assert shape_rewards(1.0, 0.0).item() == 1.0


def test_shape_rewards_errors():
    with pytest.raises(KeyError, match="reward mode 'nope'.*dualrpo"):
        shape_rewards(torch.ones(2), torch.ones(2), mode="nope")
    with pytest.raises(ValueError, match="same shape"):
        shape_rewards(torch.ones(2), torch.ones(3))
    with pytest.raises(ValueError, match=r"v\[1\] = 1.5"):
        shape_rewards(torch.tensor([0.5, 1.5]), torch.ones(2))
    with pytest.raises(ValueError, match="u has a non-finite value at flat index 2"):
        shape_rewards(torch.ones(3), torch.tensor([0.0, 1.0, float("nan")]))


@settings(max_examples=80, deadline=None)
@given(v1=st.floats(0, 1), v2=st.floats(0, 1), u=st.floats(0, 50), mu=st.floats(0, 1), lam=st.floats(0, 1))
def test_dualrpo_reward_is_increasing_in_v(v1, v2, u, mu, lam):
    assume(v1 < v2)
    r1, r2 = shape_rewards(torch.tensor([v1, v2], dtype=torch.float64), torch.tensor([u, u], dtype=torch.float64),
                           mu=mu, lam=lam).tolist()
    # r2 - r1 = (v2 - v1)(1 + (mu + lam) u) >= v2 - v1 > 0
    assert r2 - r1 >= (v2 - v1) * (1 - 1e-9) - 1e-12


@pytest.mark.parametrize("estimator", ["grpo", "drgrpo", "rloo"])
@pytest.mark.parametrize("g", [2, 3, 8])
def test_group_advantages_match_reference(estimator, g):
    gen = torch.Generator().manual_seed(g)
    rewards = torch.rand(5 * g, generator=gen, dtype=torch.float64)
    rewards[:g] = 0.25  # one flat group
    got = group_advantages(rewards, g, eps=1e-6, estimator=estimator)
    assert got.dtype == torch.float64
    ref = ref_advantages(rewards.tolist(), g, 1e-6, estimator)
    assert got.tolist() == pytest.approx(ref, rel=1e-10, abs=1e-12)
    assert got[:g].tolist() == [0.0] * g


def test_grpo_biased_std_option_and_float32_output():
    r = torch.tensor([0.0, 1.0, 1.0, 1.0])
    got = group_advantages(r, 4, eps=0.0, correction=0)
    mean, sd = 0.75, statistics.pstdev([0.0, 1.0, 1.0, 1.0])
    assert got.dtype == torch.float32
    assert got.tolist() == pytest.approx([(x - mean) / sd for x in [0, 1, 1, 1]], rel=1e-6)
    assert group_advantages(torch.tensor([1, 0, 3, 3]), 2).dtype == torch.float32


def test_rloo_is_reward_minus_others_mean():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert group_advantages(r, 4, estimator="rloo").tolist() == pytest.approx([1.0, -1 / 3, -1 / 3, -1 / 3], rel=1e-7)


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(torch.ones(4), 3)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.ones(2, 2), 2)
    with pytest.raises(ValueError, match="positive int"):
        group_advantages(torch.ones(4), 0)
    with pytest.raises(ValueError, match="rloo needs group_size >= 2"):
        group_advantages(torch.ones(4), 1, estimator="rloo")
    with pytest.raises(ValueError, match="grpo .* group_size >= 2"):
        group_advantages(torch.tensor([0.0, 1.0]), 1)
    with pytest.raises(ValueError, match=r"reward 3 \(group 1\) is not finite"):
        group_advantages(torch.tensor([0.0, 1.0, 2.0, float("inf")]), 2)
    with pytest.raises(KeyError, match="advantage estimator 'ppo'"):
        group_advantages(torch.ones(4), 2, estimator="ppo")
    assert group_advantages(torch.tensor([0.3, 0.7]), 1, estimator="drgrpo").tolist() == [0.0, 0.0]


reward_lists = st.integers(2, 8).flatmap(
    lambda g: st.tuples(st.just(g), st.lists(st.floats(-10, 10), min_size=g, max_size=4 * g)
                        .map(lambda xs: xs[: len(xs) - len(xs) % g])))


@settings(max_examples=80, deadline=None)
@given(reward_lists, st.sampled_from(["grpo", "drgrpo", "rloo"]))
def test_groups_sum_to_zero(case, estimator):
    g, xs = case
    adv = group_advantages(torch.tensor(xs, dtype=torch.float64), g, estimator=estimator).view(-1, g)
    scale = max(1.0, max(abs(x) for x in xs)) if estimator != "grpo" else math.sqrt(g)
    for row in adv.tolist():
        assert abs(math.fsum(row)) <= 1e-9 * scale * g


@settings(max_examples=60, deadline=None)
@given(st.floats(-1e6, 1e6), st.integers(1, 9), st.integers(2, 16),
       st.sampled_from(["grpo", "drgrpo", "rloo"]), st.sampled_from([torch.float32, torch.float64]))
def test_equal_rewards_give_exactly_zero(value, groups, g, estimator, dtype):
    adv = group_advantages(torch.full((groups * g,), value, dtype=dtype), g, estimator=estimator)
    assert torch.equal(adv, torch.zeros(groups * g, dtype=dtype))


def test_equal_rewards_with_ulp_level_mean_error_are_zero():
    # mean([0.1] * 3) != 0.1 in float64; the flat-group rule must still give exactly 0.
    assert sum([0.1] * 3) / 3 != 0.1
    assert group_advantages(torch.full((3,), 0.1, dtype=torch.float64), 3).tolist() == [0.0] * 3


def test_broadcast_to_tokens():
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    assert broadcast_to_tokens(adv, mask).tolist() == [[2.0, 2.0, 0.0], [0.0, -1.0, -1.0]]
    with pytest.raises(ValueError, match="do not match mask"):
        broadcast_to_tokens(torch.ones(3), mask)
