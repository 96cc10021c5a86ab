"""Token-balanced micro-batch partition, checked against brute force on small cases."""
import itertools
import random

import pytest

from dualrpo_mcore.trainer.microbatch import partition


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
