"""Preemption and time limits, the way clusters end jobs.

Slurm signals a job before killing it: SIGTERM at preemption or ``scancel --signal=TERM``, and the
signal named by ``sbatch --signal=SIG@SECONDS`` (usually SIGUSR1) that long before the time limit. A
trainer that dies there loses every step since its last checkpoint. Here the signal only sets a flag;
at the end of the step in flight every rank learns whether any rank was signalled (one tiny
all-reduce per step, so all ranks stop at the same step), the step is checkpointed if it was not
already, and :class:`Preempted` ends the run. ``dualrpo train`` turns it into exit status
:data:`REQUEUE_EXIT` (75, EX_TEMPFAIL: "try again"), which a job script or a requeue policy can tell
from a failure (1) and from a finished run (0); ``--resume auto`` then continues from that step.

Steps lost: none when the grace time covers the rest of the step plus one checkpoint; otherwise the
hard kill that follows costs what any kill costs (the steps since the last checkpoint).
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
REQUEUE_EXIT = 75
SIGNALS = ("SIGTERM", "SIGUSR1")


class Preempted(Exception):
    """The run stopped on a cluster signal after checkpointing ``step``."""

    def __init__(self, step: int, signame: str):
        super().__init__(f"stopped by {signame} after step {step}, which is checkpointed; "
                         f"rerun the same command with --resume auto (checkpoint.resume='auto') to continue")
        self.step, self.signame = step, signame


class Watch:
    """Handlers installed for the run's duration (previous ones restored on ``close``)."""

    def __init__(self):
        self.received: Optional[str] = None
        self._previous: Dict[int, object] = {}
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach the main thread only; a run in a worker thread is not preemptible
        for name in SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        # Only a flag: the step in flight (collectives, a half-written checkpoint) must finish cleanly.
        self.received = signal.Signals(signum).name
        print(f"dualrpo: received {self.received}; stopping after the step in flight", flush=True)

    def agreed(self) -> Optional[str]:
        """The signal any rank received (the same answer on every rank), or None."""
        codes: List[str] = list(SIGNALS)
        mine = float(codes.index(self.received) + 1) if self.received in codes else 0.0
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([mine], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            mine = float(t[0])
        return codes[int(mine) - 1] if mine else None

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
