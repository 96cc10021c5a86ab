"""Fault points the loop passes through, so tests can kill a run (or make a write fail) at an exact
place instead of hoping a timer lands there.

Off unless ``DUALRPO_FAULT`` names a point and a step when :func:`arm` runs (the loop calls it once at
start)::

    DUALRPO_FAULT=<point>@<step>[,<action>][,rank=<r>]

``point`` is one of :data:`POINTS`; ``action`` is ``kill`` (SIGKILL to this process, the default: no
cleanup, no flush, as a preemption or the OOM killer does it) or an errno name (``ENOSPC``, ``EIO``,
``EROFS``, ...) to raise that ``OSError`` at the point, as a failed write would; ``rank`` restricts the
fault to one global rank (default: every rank, as when a node goes away).

When disarmed, :func:`at` is one global read and a compare: nothing else in the loop changes.
"""
from __future__ import annotations

import errno
import os
import signal
from dataclasses import dataclass
from typing import Optional

ENV = "DUALRPO_FAULT"
# In the order a step passes them. The log of a step precedes its checkpoint (see recovery.commit).
POINTS = (
    "after_rollout",     # the step's samples are verified and shaped; nothing updated yet
    "in_update",         # after the step's first optimizer update: weights moved, nothing saved
    "after_sync",        # the engine serves the new weights (and the probe agreed)
    "after_log",         # the step's record is on disk (fsynced); its checkpoint not begun
    "mid_checkpoint",    # this rank wrote its files into step_N.tmp; nothing renamed yet
    "after_checkpoint",  # step_N is published; the next step has not begun
)


@dataclass(frozen=True)
class Fault:
    point: str
    step: int
    action: str = "kill"
    rank: Optional[int] = None


_armed: Optional[Fault] = None


def parse(spec: str) -> Fault:
    """``"mid_checkpoint@3,EIO,rank=1"`` -> :class:`Fault`; a malformed spec is an error naming it."""
    head, *opts = [p.strip() for p in spec.split(",")]
    point, sep, step = head.partition("@")
    if not sep or point not in POINTS or not step.strip().isdigit():
        raise ValueError(f"{ENV}={spec!r}: expected <point>@<step>[,<action>][,rank=<r>] with point one of "
                         f"{', '.join(POINTS)}")
    action, rank = "kill", None
    for opt in opts:
        if opt.startswith("rank="):
            rank = int(opt[len("rank="):])
        elif opt == "kill" or isinstance(getattr(errno, opt, None), int):
            action = opt
        else:
            raise ValueError(f"{ENV}={spec!r}: unknown action {opt!r} (kill or an errno name such as ENOSPC)")
    return Fault(point, int(step), action, rank)


def arm(spec: Optional[str] = None) -> Optional[Fault]:
    """Arm the fault named by ``spec`` (default: ``$DUALRPO_FAULT``); disarm when it is empty."""
    global _armed
    spec = os.environ.get(ENV, "") if spec is None else spec
    _armed = parse(spec) if spec.strip() else None
    return _armed


def at(point: str, step: int, path: Optional[str] = None) -> None:
    """Fire the armed fault if it names ``point`` and ``step`` (``path``: the file an injected
    ``OSError`` names, as a real one would)."""
    fault = _armed
    if fault is None or fault.point != point or fault.step != step:
        return
    from dualrpo_mcore.parallel import global_rank

    rank = global_rank()
    if fault.rank is not None and fault.rank != rank:
        return
    print(f"fault injection: {fault.action} at {fault.point}@{fault.step} (rank {rank})", flush=True)
    if fault.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    code = getattr(errno, fault.action)
    raise OSError(code, f"{os.strerror(code)} (injected at {fault.point}@{fault.step})", path)
