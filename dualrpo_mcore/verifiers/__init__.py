"""Verifiers: per-sample rewards in [0, 1] for the eight tasks, scored in a sandbox.

The public front door (docs/design.md section 3.5)::

    from dualrpo_mcore.verifiers import verify
    reward = verify({"verifier": "math", "answer": "\\frac{1}{2}"}, response)

``verify``'s guarantees (never raises, bounded by ``DUALRPO_VERIFY_TIMEOUT``, cold start
included): docs/design.md §3.5. It scores in a process-wide :class:`VerifierPool` (created lazily
on first use, its workers started in the background); past the budget the reward is 0. The default
pool has ``DUALRPO_VERIFY_WORKERS`` (default 2) workers. A trainer scoring whole rollouts should
own a pool (``with VerifierPool(num_workers=16) as pool: pool.verify_batch(...)``), which also
gives it statuses and counters for its metrics.

The in-process scorers (``score``, ``score_with_info``, ``validate_spec``, ``register_verifier``,
``VERIFIERS``) live in ``scoring`` and ``base`` and are re-exported here on first access (PEP 562),
not at import: the pool's parent side (the trainer) never needs sympy, and a worker
(``python -m dualrpo_mcore.verifiers.sandbox.worker``, which imports this package first) must be able to
set its limits before the heavy imports happen. In-process ``score`` has no time or memory limit:
use it on trusted strings only (data validation, tests, the serial baseline of the benchmark).

Layout (this front door and the scorers' shared parts, ``tasks/``, ``sandbox/``): docs/design.md §2.3.
"""
from __future__ import annotations

import importlib
import os
import threading
import time
from typing import Any, Optional, Sequence

from dualrpo_mcore.verifiers.sandbox.pool import VerifierPool, VerifierPoolError, VerifyResult

__all__ = [
    "verify", "verify_batch", "default_pool", "shutdown_default_pool", "VerifierPool", "VerifierPoolError", "VerifyResult",
    "score", "score_with_info", "validate_spec", "register_verifier", "VERIFIERS",
]

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_WORKERS = 2

# name -> module that defines it; resolved on first attribute access (PEP 562).
_LAZY = {
    "score": "dualrpo_mcore.verifiers.scoring",
    "score_with_info": "dualrpo_mcore.verifiers.scoring",
    "validate_spec": "dualrpo_mcore.verifiers.scoring",
    "register_verifier": "dualrpo_mcore.verifiers.base",
    "VERIFIERS": "dualrpo_mcore.verifiers.scoring",  # scoring imports the built-ins into it
}

_default_pool: Optional[VerifierPool] = None
_default_lock = threading.Lock()


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not a number") from None
    if not value > 0:
        raise ValueError(f"environment variable {name}={raw!r} must be > 0")
    return value


def default_timeout_s() -> float:
    """The front door's budget: ``DUALRPO_VERIFY_TIMEOUT`` seconds, else 5."""
    return _env_float("DUALRPO_VERIFY_TIMEOUT", DEFAULT_TIMEOUT_S)


def default_pool() -> VerifierPool:
    """The process-wide pool behind ``verify``; created on first call, recreated after a fork."""
    global _default_pool
    with _default_lock:
        pool = _default_pool
        if pool is None or pool._owner_pid != os.getpid() or pool._closing:
            workers = int(_env_float("DUALRPO_VERIFY_WORKERS", DEFAULT_WORKERS))
            pool = _default_pool = VerifierPool(num_workers=workers, timeout_s=default_timeout_s())
        return pool


def _forget_after_fork() -> None:
    # The child must not touch the parent's workers; it makes its own pool on first use.
    global _default_pool, _default_lock
    _default_pool, _default_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


def shutdown_default_pool() -> None:
    """Close the default pool now (it is also closed at exit); the next ``verify`` restarts it."""
    global _default_pool
    with _default_lock:
        pool, _default_pool = _default_pool, None
    if pool is not None and pool._owner_pid == os.getpid():
        pool.close()


def verify(spec: dict, response: str, *, progress: Optional[float] = None,
           timeout_s: Optional[float] = None) -> float:
    """Reward in [0, 1] of ``response`` against ``spec``, scored in the sandbox.

    Never raises for any response string (or spec content: a bad spec scores 0) and returns
    within ``timeout_s`` (default :func:`default_timeout_s`) plus a few milliseconds, cold start
    of the default pool included; a sample not scored by then gets 0. Only a broken install
    (workers that can not start at all) raises :class:`VerifierPoolError`.
    """
    budget = default_timeout_s() if timeout_s is None else float(timeout_s)
    start = time.monotonic()
    pool = default_pool()
    remaining = max(1e-3, budget - (time.monotonic() - start))
    result = pool.verify_batch([spec], [response], progress, timeout_s=remaining,
                               total_timeout_s=remaining)[0]
    return result.reward


def verify_batch(specs: Sequence[dict], responses: Sequence[str], *, progress: Optional[float] = None,
                 timeout_s: Optional[float] = None) -> list[VerifyResult]:
    """Score a batch in the default pool; ``timeout_s`` is the per-sample budget."""
    return default_pool().verify_batch(specs, responses, progress, timeout_s=timeout_s)
