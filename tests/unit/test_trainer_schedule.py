"""The paper's schedule: linear warm-up over ceil(5% of the updates), then constant; the optional
linear decay at the end (what ``dualrpo sft`` uses)."""
import pytest

from dualrpo_mcore.actor.schedule import lr_at, lr_factor, warmup_steps


def test_warmup_length_is_ceil_of_fraction():
    assert warmup_steps(100, 0.05) == 5  # 0.05 * 100 is 5.000000000000001 in floats: must not give 6
    assert warmup_steps(101, 0.05) == 6
    assert warmup_steps(10, 0.05) == 1
    assert warmup_steps(1, 0.05) == 1
    assert warmup_steps(1000, 0.0) == 0
    assert warmup_steps(60, 0.05) == 3


def test_lr_exact_values():
    lr = 1e-6
    # Hand-written expectation for 100 updates: 1/5, 2/5, ..., 5/5 of the peak, then the peak.
    want = [lr * k / 5 for k in range(1, 6)] + [lr] * 95
    got = [lr_at(s, lr, 100, 0.05) for s in range(100)]
    assert got == want
    assert lr_at(10_000, lr, 100, 0.05) == lr  # constant past the planned end too


def test_no_warmup_is_constant_and_first_step_never_zero():
    assert [lr_factor(s, 7, 0.0) for s in range(7)] == [1.0] * 7
    assert lr_factor(0, 10, 0.05) == 1.0  # one warm-up step: it already reaches the peak
    assert lr_factor(0, 1000, 0.05) == 1 / 50


def test_decay_tail_exact_values():
    # 10 updates, no warm-up, decay over ceil(0.3 * 10) = 3: 3/4, 2/4, 1/4 of the peak, and 1/4 after the end.
    assert [lr_factor(s, 10, 0.0, 0.3) for s in range(12)] == [1.0] * 7 + [0.75, 0.5, 0.25, 0.25, 0.25]
    # 100 updates, 5 warm-up and 10 decay: the two ramps do not touch the constant middle.
    got = [lr_at(s, 1e-6, 100, 0.05, 0.1) for s in range(100)]
    assert got[:5] == [1e-6 * k / 5 for k in range(1, 6)] and got[5:90] == [1e-6] * 85
    assert got[90:] == pytest.approx([1e-6 * k / 11 for k in range(10, 0, -1)], rel=1e-12)


def test_warmup_and_decay_overlapping_take_the_lower_ramp():
    assert lr_factor(0, 1, 0.05, 0.1) == 0.5  # one update: warm-up says 1, decay says 1/2
    assert [lr_factor(s, 3, 0.5, 0.5) for s in range(3)] == [0.5, 2 / 3, 1 / 3]


@pytest.mark.parametrize("args", [(-1, 10, 0.05), (0, 0, 0.05), (0, 10, 1.0), (0, 10, -0.1),
                                  (0, 10, 0.05, 1.0), (0, 10, 0.05, -0.1)])
def test_bad_arguments(args):
    with pytest.raises(ValueError):
        lr_factor(*args)
