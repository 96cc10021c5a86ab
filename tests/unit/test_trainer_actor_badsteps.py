"""Poisoned-step guard: skip and count, reset on a good step, abort with a clear message."""
import logging

import pytest

from dualrpo_mcore.actor.badsteps import BadStepGuard, PoisonedStepError


def test_skip_count_reset_and_abort(caplog):
    g = BadStepGuard(3)
    with caplog.at_level(logging.WARNING):
        assert g.record(False, 0, "loss=nan") is False
    assert "update 0 skipped" in caplog.text and "loss=nan" in caplog.text
    assert g.record(False, 1) is False
    assert g.record(True, 2) is True and g.consecutive == 0 and g.total == 2
    g.record(False, 3)
    g.record(False, 4)
    with pytest.raises(PoisonedStepError, match=r"3 consecutive updates.*max_consecutive=3"):
        g.record(False, 5, "grad_norm=inf")


def test_state_round_trip_and_bad_limit():
    g = BadStepGuard(2)
    g.record(False, 0)
    h = BadStepGuard(2)
    h.load_state_dict(g.state_dict())
    with pytest.raises(PoisonedStepError):
        h.record(False, 1)
    with pytest.raises(ValueError):
        BadStepGuard(0)
