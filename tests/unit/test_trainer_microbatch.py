"""Token-balanced micro-batch partition, checked against brute force on small cases."""
import itertools
import random

import pytest

from dualrpo_mcore.actor.microbatch import partition


def _check_cover(bins, n):
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(n)), "every row exactly once"
    assert all(b == sorted(b) and b for b in bins)
    assert [b[0] for b in bins] == sorted(b[0] for b in bins)


def _optimal_makespan(lengths, k):
    best = float("inf")
    for assign in itertools.product(range(k), repeat=len(lengths)):
        loads = [0] * k
        for i, b in enumerate(assign):
            loads[b] += lengths[i]
        best = min(best, max(loads))
    return best


def test_fits_and_balances_against_brute_force():
    rng = random.Random(0)
    for _ in range(40):
        n = rng.randint(1, 7)
        lengths = [rng.randint(1, 50) for _ in range(n)]
        cap = rng.randint(max(lengths), 120)
        bins = partition(lengths, cap)
        _check_cover(bins, n)
        loads = [sum(lengths[i] for i in b) for b in bins]
        assert max(loads) <= cap
        # As few micro-batches as the token budget allows, give or take the greedy's slack,
        # and the heaviest within LPT's 4/3 bound of the optimum for that count.
        assert len(bins) >= -(-sum(lengths) // cap)
        assert max(loads) <= 4 / 3 * _optimal_makespan(lengths, len(bins)) + 1e-9


def test_known_case():
    # 4 rows of 6,5,4,3 tokens under 10 per micro-batch: 18 tokens -> 2 micro-batches of 9.
    assert partition([6, 5, 4, 3], 10) == [[0, 3], [1, 2]]


def test_oversize_row_alone_and_min_count():
    bins = partition([100, 3, 3], 10)
    _check_cover(bins, 3)
    assert [0] in bins and max(sum([100, 3, 3][i] for i in b) for b in bins if b != [0]) <= 10
    assert len(partition([1, 1, 1, 1], 100, min_microbatches=3)) == 3
    assert partition([], 10) == []


def test_deterministic():
    lengths = [5, 5, 5, 5, 2, 2]
    assert partition(lengths, 8) == partition(list(lengths), 8)


@pytest.mark.parametrize("kw", [dict(lengths=[1], max_tokens=0), dict(lengths=[-1], max_tokens=3),
                                dict(lengths=[1, 2], max_tokens=3, min_microbatches=3)])
def test_bad_arguments(kw):
    with pytest.raises(ValueError):
        partition(**kw)


def _unit_of(units):
    return {i: j for j, u in enumerate(units) for i in u}


def test_units_stay_whole_when_they_fit():
    rng = random.Random(1)
    for _ in range(40):
        g = rng.randint(1, 4)
        n = g * rng.randint(1, 5)
        lengths = [rng.randint(1, 30) for _ in range(n)]
        units = [list(range(i, i + g)) for i in range(0, n, g)]
        rng.shuffle(lengths)
        cap = rng.randint(max(sum(lengths[i] for i in u) for u in units), 150)
        bins = partition(lengths, cap, units=units)
        _check_cover(bins, n)
        assert max(sum(lengths[i] for i in b) for b in bins) <= cap
        where = _unit_of(units)
        for b in bins:  # a unit's rows all land in one micro-batch
            for u in {where[i] for i in b}:
                assert set(units[u]) <= set(b)


def test_unit_over_the_cap_is_split_and_min_count_splits_units():
    # rows 0-2 (3 x 6 = 18 tokens) exceed 10 together: they are packed as rows; rows 3-4 stay together.
    bins = partition([6, 6, 6, 2, 2], 10, units=[[0, 1, 2], [3, 4]])
    _check_cover(bins, 5)
    assert max(sum([6, 6, 6, 2, 2][i] for i in b) for b in bins) <= 10
    assert any({3, 4} <= set(b) for b in bins)
    # A unit of 6 rows x 4 tokens under a cap of 8 is cut into 3 runs of 2: each micro-batch holds one
    # image's rows only, where splitting into single rows would let LPT mix the two units.
    lengths = [4] * 12
    bins = partition(lengths, 8, units=[[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]])
    _check_cover(bins, 12)
    assert all(len({i // 6 for i in b}) == 1 and sum(lengths[i] for i in b) <= 8 for b in bins)
    # Two units but three micro-batches wanted (data-parallel ranks agree on a count): rows again.
    assert len(partition([1, 1, 1, 1], 100, min_microbatches=3, units=[[0, 1], [2, 3]])) == 3
    assert partition([1, 1, 1, 1], 100, units=[[0, 1], [2, 3]]) == [[0, 1, 2, 3]]


def test_units_must_cover_every_row_once():
    with pytest.raises(ValueError, match="cover rows 0..2 exactly once"):
        partition([1, 1, 1], 10, units=[[0, 1], [1, 2]])
