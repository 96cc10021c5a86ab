"""Verifier registry and the per-sample *spec* format (V-Triune sample-level rewards).

The spec's two forms, the weights' rules, the built-in names and the verifier signature:
docs/design.md §3.5. E.g. ``{"components": [{"verifier": "math", "answer": "3", "weight": 0.9},
{"verifier": "format", "weight": 0.1, "params": {"mode": "think_answer"}}]}``.

``answer`` is required unless the verifier declares ``needs_answer=False`` (only ``format`` does);
its type depends on the verifier (string, number, box list, ...). Unknown ``params`` keys are
rejected so that a typo in a dataset is caught when the data loader calls ``validate_spec``, not
silently ignored during a week-long run. ``ctx.progress`` is None outside training. A verifier may
raise :class:`Unparsable` to say "no answer could be read from the response" (scored 0, status
``unparsable``); any other exception is caught by ``scoring`` and reported as ``error``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from dualrpo_mcore.registry import Registry


class Unparsable(Exception):
    """The response holds no answer this verifier can read; the score is 0."""


@dataclass(frozen=True)
class Context:
    """What a verifier may know beyond the sample: training progress in [0, 1] or None."""

    progress: Optional[float] = None


VerifierFn = Callable[[Any, str, Mapping[str, Any], Context], float]
CheckFn = Callable[[Any, Mapping[str, Any]], None]


@dataclass(frozen=True)
class VerifierDef:
    name: str
    fn: VerifierFn
    params: frozenset  # accepted parameter names
    check: Optional[CheckFn] = None  # raises ValueError naming the field
    needs_answer: bool = True


VERIFIERS: Registry[VerifierDef] = Registry("verifier")


def register_verifier(name: str, *, params=(), check: Optional[CheckFn] = None,
                      needs_answer: bool = True, override: bool = False):
    """Decorator registering ``fn(answer, response, params, ctx) -> float`` under ``name``.

    ``params`` lists the accepted parameter names; ``check(answer, params)`` validates the spec
    content and raises ``ValueError`` whose message names the offending field.
    """

    def deco(fn: VerifierFn) -> VerifierFn:
        VERIFIERS.register(name, VerifierDef(name, fn, frozenset(params), check, needs_answer),
                           override=override)
        return fn

    return deco


def response_text(response: Any) -> str:
    """A response as text: bytes decoded as UTF-8 (invalid bytes replaced), None as ""."""
    if isinstance(response, str):
        return response
    if isinstance(response, (bytes, bytearray)):
        return bytes(response).decode("utf-8", errors="replace")
    return "" if response is None else str(response)


# ---------------------------------------------------------------------------------------------
# small helpers shared by the verifiers' ``check`` functions

def param_number(params: Mapping[str, Any], key: str, *, lo: float | None = None,
                 hi: float | None = None, default=None, allow_none: bool = False):
    """Read a numeric param with range checks; error names ``params.<key>``."""
    val = params.get(key, default)
    if val is None and (allow_none or default is None):
        return val
    if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val):
        raise ValueError(f"params.{key} must be a finite number, got {val!r}")
    if lo is not None and val < lo:
        raise ValueError(f"params.{key} must be >= {lo}, got {val!r}")
    if hi is not None and val > hi:
        raise ValueError(f"params.{key} must be <= {hi}, got {val!r}")
    return val


def param_choice(params: Mapping[str, Any], key: str, choices, default):
    val = params.get(key, default)
    if val not in choices:
        raise ValueError(f"params.{key} must be one of {sorted(map(str, choices))}, got {val!r}")
    return val


def param_bool(params: Mapping[str, Any], key: str, default: bool) -> bool:
    val = params.get(key, default)
    if not isinstance(val, bool):
        raise ValueError(f"params.{key} must be a bool, got {val!r}")
    return val


def param_int(params: Mapping[str, Any], key: str, default: int, *, lo: int = 0,
              hi: int | None = None) -> int:
    val = params.get(key, default)
    if isinstance(val, bool) or not isinstance(val, int) or val < lo or (hi is not None and val > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"params.{key} must be an int in {rng}, got {val!r}")
    return val


def param_pair(params: Mapping[str, Any], key: str, what: str):
    """An optional ``[a, b]`` of positive numbers (an image size); error names ``params.<key>``."""
    val = params.get(key)
    if val is not None and not (isinstance(val, (list, tuple)) and len(val) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in val)):
        raise ValueError(f"params.{key} must be {what} > 0, got {val!r}")
    return val
