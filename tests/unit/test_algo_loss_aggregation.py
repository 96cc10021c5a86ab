"""Loss aggregations (issue 30): a batch's loss does not depend on how its rows are split or padded,
empty rows count in no denominator, and Dr. GRPO divides by a constant of the run.

The distributed test ``tests/distributed/test_loss_split_invariance.py`` checks the same through the
Megatron actor; these are the pure-torch rules it relies on, on awkward shapes, in float64.
"""
import numpy as np
import pytest
import torch

from dualrpo_mcore.algo import LOSS_AGGREGATIONS, PolicyLossConfig, aggregate, aggregation_count, policy_loss

AGGS = ["token-mean", "seq-mean", "seq-mean-token-sum-norm"]
L = 13


def _batch(seed, B=7, T=9, empty=(2, 5)):
    rng = np.random.default_rng(seed)
    x = torch.tensor(rng.normal(size=(B, T)))
    mask = torch.tensor(rng.uniform(size=(B, T)) < 0.7, dtype=torch.float64)
    mask[:, 0] = 1.0  # no row is empty by chance
    for r in empty:
        mask[r] = 0.0
    return x, mask


def _reference(x, mask, agg):
    """The rule written out row by row: empty rows are not in the batch."""
    rows = [(x[r][mask[r] > 0]).tolist() for r in range(x.shape[0]) if mask[r].sum() > 0]
    if agg == "token-mean":
        flat = [v for row in rows for v in row]
        return sum(flat) / len(flat)
    if agg == "seq-mean":
        return sum(sum(row) / len(row) for row in rows) / len(rows)
    return sum(sum(row) / L for row in rows) / len(rows)


@pytest.mark.parametrize("agg", AGGS)
def test_aggregation_matches_the_written_rule(agg):
    x, mask = _batch(0)
    got = aggregate(x, mask, agg, max_response_length=L)
    assert got.item() == pytest.approx(_reference(x, mask, agg), rel=1e-12)


@pytest.mark.parametrize("agg", AGGS)
def test_empty_rows_change_nothing(agg):
    x, mask = _batch(1)
    keep = mask.sum(-1) > 0
    with_empty = aggregate(x, mask, agg, max_response_length=L)
    without = aggregate(x[keep], mask[keep], agg, max_response_length=L)
    assert with_empty.item() == pytest.approx(without.item(), rel=1e-12)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("split", [[[0, 1, 2, 3, 4, 5, 6]], [[0, 2, 4, 6], [1, 3, 5]], [[0], [1, 2], [3, 6], [4, 5]]])
def test_pieces_with_the_global_count_sum_to_the_whole(agg, split):
    # Each piece trimmed to its longest row and padded back out by a different amount, as micro-batches are:
    # neither the width nor the row count of a piece may enter the result.
    x, mask = _batch(2)
    whole = aggregate(x, mask, agg, max_response_length=L)
    den = aggregation_count(mask, agg)
    total = torch.zeros((), dtype=torch.float64)
    for i, rows in enumerate(split):
        px, pm = x[rows], mask[rows]
        width = int(pm.nonzero()[:, 1].max()) + 1 if pm.any() else 1
        pad = torch.zeros(len(rows), 3 * i, dtype=torch.float64)
        px, pm = torch.cat([px[:, :width], pad + 1e3], 1), torch.cat([pm[:, :width], pad], 1)
        total = total + aggregate(px, pm, agg, max_response_length=L, denominator=den)
    assert total.item() == pytest.approx(whole.item(), rel=1e-12)


def test_global_count_is_the_local_rule():
    x, mask = _batch(3)
    assert aggregation_count(mask, "token-mean").item() == mask.sum().item()
    for agg in ("seq-mean", "seq-mean-token-sum-norm"):
        assert aggregation_count(mask, agg).item() == 5.0  # 7 rows, 2 empty
        assert aggregation_count(mask, agg).dtype == torch.float64
    assert LOSS_AGGREGATIONS.names() == sorted(AGGS)


def test_dr_grpo_needs_its_constant():
    x, mask = _batch(4)
    with pytest.raises(ValueError, match="max_response_length"):
        aggregate(x, mask, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="max_response_length"):
        policy_loss(x, x, torch.zeros(7), mask, agg="seq-mean-token-sum-norm")


def test_dr_grpo_divisor_resolution_and_check():
    cfg = PolicyLossConfig(agg="seq-mean-token-sum-norm")
    assert cfg.token_sum_norm is None
    with pytest.raises(ValueError, match=r"actor\.loss\.max_response_length.*actor\.loss\.response_budget"):
        cfg.check_complete("actor.loss")
    cfg.response_budget = 24
    assert cfg.token_sum_norm == 24
    cfg.check_complete("actor.loss")
    cfg.max_response_length = 100  # set by hand, it wins over the budget
    assert cfg.token_sum_norm == 100
    PolicyLossConfig().check_complete()  # token-mean needs no constant
    x, mask = _batch(5)
    by_cfg, _ = policy_loss(x, x, torch.ones(7), mask, config=PolicyLossConfig(agg="seq-mean-token-sum-norm",
                                                                               response_budget=L))
    assert by_cfg.item() == pytest.approx(-aggregate(torch.ones_like(x), mask, "seq-mean-token-sum-norm",
                                                     max_response_length=L).item(), rel=1e-12)
