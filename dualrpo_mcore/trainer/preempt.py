"""Preemption and time limits, the way clusters end jobs.

The signal only sets a flag; at the end of the step in flight every rank learns whether any rank was
signalled (one tiny all-reduce per step, so all ranks stop at the same step), the step is checkpointed
if it was not already, rank 0 leaves :data:`MARKER`, and :class:`Preempted` ends the run
(``dualrpo train`` exits :data:`REQUEUE_EXIT`). The path from Slurm's signal through torchrun to the
job script's trap (``launch.nemo.exit_lines``), and why a marker as well as the status:
docs/slurm.md; exit statuses: docs/design.md §3.6.

Steps lost: none when the grace time covers the rest of the step plus one checkpoint; otherwise the
hard kill that follows costs what any kill costs (the steps since the last checkpoint).
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Dict, Optional

import torch
import torch.distributed as dist

from . import storage

REQUEUE_EXIT = 75
SIGNALS = ("SIGTERM", "SIGUSR1")
MARKER = "preempted"
"""File in the run dir: ``key=value`` lines (``step``, ``signal``, ``attempt``, ``time``), read by a
shell script with ``grep``, so no JSON."""


def attempt() -> str:
    """This job attempt: ``<SLURM_JOB_ID>.<SLURM_RESTART_COUNT>`` (a requeued job keeps its id and counts
    up), or ``local`` outside Slurm. A marker left by an earlier attempt never matches a later one."""
    job = os.environ.get("SLURM_JOB_ID")
    return f"{job}.{os.environ.get('SLURM_RESTART_COUNT') or 0}" if job else "local"


def write_marker(run_dir: str, step: int, signame: str) -> str:
    """Write ``<run_dir>/preempted`` atomically (a reader sees the old marker or the new one)."""
    from dualrpo_mcore.atomic import atomic_write

    path = os.path.join(run_dir, MARKER)
    atomic_write(path, f"step={step}\nsignal={signame}\nattempt={attempt()}\ntime={time.time():.3f}\n")
    return path


def read_marker(run_dir: str) -> Optional[Dict[str, str]]:
    """The marker's fields, or None when there is none."""
    try:
        with open(os.path.join(run_dir, MARKER), encoding="utf-8") as f:
            return dict(line.rstrip("\n").partition("=")[::2] for line in f if "=" in line)
    except FileNotFoundError:
        return None


class Preempted(Exception):
    """The run stopped on a cluster signal after checkpointing ``step``."""

    def __init__(self, step: int, signame: str):
        super().__init__(f"stopped by {signame} after step {step}, which is checkpointed; "
                         f"rerun the same command with --resume auto (checkpoint.resume='auto') to continue")
        self.step, self.signame = step, signame


class Watch:
    """Handlers installed for the run's duration (previous ones restored on ``close``)."""

    def __init__(self, run_dir: Optional[str] = None):
        self.run_dir = run_dir
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
        mine = float(SIGNALS.index(self.received) + 1) if self.received in SIGNALS else 0.0
        if storage.dist_world() > 1:
            t = torch.tensor([mine], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            mine = float(t[0])
        return SIGNALS[int(mine) - 1] if mine else None

    def stopped(self, step: int, signame: str) -> Preempted:
        """Call once ``step`` is checkpointed: rank 0 leaves the marker; returns the exception to raise.
        A marker that cannot be written costs only the exit status (the job shows a failure, 1), not
        the checkpoint, so it is reported and the run still stops."""
        if self.run_dir and storage.dist_rank() == 0:
            try:
                write_marker(self.run_dir, step, signame)
            except OSError as e:
                print(f"dualrpo: could not write the preemption marker in {self.run_dir} ({e}); the job will "
                      f"end as failed although step {step} is checkpointed", flush=True)
        return Preempted(step, signame)

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
