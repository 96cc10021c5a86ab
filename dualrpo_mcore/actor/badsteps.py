"""Poisoned-step bookkeeping: a NaN/inf loss or gradient skips the update; too many in a row abort."""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class PoisonedStepError(RuntimeError):
    """Raised after ``max_consecutive`` bad updates in a row."""


class BadStepGuard:
    """Counts consecutive bad updates. ``record(ok, step, detail)`` returns ``ok``; it logs a skipped
    step and raises :class:`PoisonedStepError` when ``max_consecutive`` bad ones follow each other."""

    def __init__(self, max_consecutive: int):
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total = 0

    def record(self, ok: bool, step: int, detail: str = "") -> bool:
        if ok:
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.total += 1
        log.warning("update %d skipped: non-finite %s (%d bad in a row, %d in total); weights unchanged",
                    step, detail or "loss/gradient", self.consecutive, self.total)
        if self.consecutive >= self.max_consecutive:
            raise PoisonedStepError(
                f"aborting: {self.consecutive} consecutive updates had a non-finite loss or gradient norm "
                f"(last at update {step}: {detail or 'loss/gradient'}); limit actor.bad_steps.max_consecutive="
                f"{self.max_consecutive}. Check the learning rate, the advantages and the rollout data; "
                f"the last checkpoint holds only finite weights.")
        return False

    def state_dict(self) -> dict:
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        self.consecutive, self.total = int(state["consecutive"]), int(state["total"])
