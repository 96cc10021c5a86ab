"""The paper's schedule: linear warm-up over ceil(5% of the updates), then constant."""
import pytest

from dualrpo_mcore.trainer.schedule import lr_at, lr_factor, warmup_steps


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


@pytest.mark.parametrize("args", [(-1, 10, 0.05), (0, 0, 0.05), (0, 10, 1.0), (0, 10, -0.1)])
def test_bad_arguments(args):
    with pytest.raises(ValueError):
        lr_factor(*args)
