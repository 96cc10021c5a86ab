"""In-process scoring: ``score(spec, response, progress=None) -> float in [0, 1]``.

This is what the sandboxed pool runs inside its workers. It never raises; ``score_with_info``
returns the status (docs/design.md §3.5, with the spec format) and a short detail next to the reward.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Tuple

import dualrpo_mcore.verifiers.tasks  # noqa: F401  (registers the built-in verifiers)
from dualrpo_mcore.verifiers.base import VERIFIERS, Context, Unparsable, response_text

_MAX_COMPONENTS = 16
_DETAIL_CHARS = 300


def _where(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _validate_single(spec: Mapping[str, Any], prefix: str) -> None:
    name = spec.get("verifier")
    if not isinstance(name, str):
        raise ValueError(f"{_where(prefix, 'verifier')} must be a verifier name (str), got {name!r}")
    if name not in VERIFIERS:
        raise ValueError(f"{_where(prefix, 'verifier')}: unknown verifier {name!r}; "
                         f"known: {', '.join(VERIFIERS.names())}")
    vdef = VERIFIERS.get(name)
    if vdef.needs_answer and spec.get("answer") is None:
        raise ValueError(f"{_where(prefix, 'answer')} is required for verifier {name!r}")
    params = {} if spec.get("params") is None else spec["params"]
    if not isinstance(params, Mapping):
        raise ValueError(f"{_where(prefix, 'params')} must be a dict, got {type(params).__name__}")
    unknown = sorted(str(k) for k in params if k not in vdef.params)
    if unknown:
        raise ValueError(f"{_where(prefix, 'params')}.{unknown[0]}: unknown parameter for verifier "
                         f"{name!r}; accepted: {', '.join(sorted(vdef.params)) or '(none)'}")
    if vdef.check is not None:
        try:
            vdef.check(spec.get("answer"), params)
        except ValueError as e:
            msg = str(e)
            # checks name fields relative to the spec ("answer", "params.x"); add the path
            raise ValueError(f"{prefix}.{msg}" if prefix else msg) from None


def validate_spec(spec: Any) -> None:
    """Raise ``ValueError`` naming the offending field if ``spec`` is structurally invalid."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"spec must be a dict, got {type(spec).__name__}")
    if "components" not in spec:
        _validate_single(spec, "")
        return
    if "verifier" in spec:
        raise ValueError("spec has both 'verifier' and 'components'; use one form")
    comps = spec["components"]
    if not isinstance(comps, (list, tuple)) or not comps:
        raise ValueError("components must be a non-empty list")
    if len(comps) > _MAX_COMPONENTS:
        raise ValueError(f"components: at most {_MAX_COMPONENTS} entries, got {len(comps)}")
    total = 0.0
    for i, comp in enumerate(comps):
        where = f"components[{i}]"
        if not isinstance(comp, Mapping):
            raise ValueError(f"{where} must be a dict")
        if "components" in comp:
            raise ValueError(f"{where}.components: components may not nest")
        w = comp.get("weight", 1.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"{where}.weight must be a finite number >= 0, got {w!r}")
        total += float(w)
        _validate_single(comp, where)
    if not total > 0:
        raise ValueError("components[*].weight must sum to > 0")


def _clamp(x: Any) -> float:
    try:
        x = float(x)
    except (TypeError, ValueError, OverflowError):
        return 0.0
    if not math.isfinite(x):
        return 0.0
    return min(1.0, max(0.0, x))


def _short(e: BaseException) -> str:
    try:
        return f"{type(e).__name__}: {e}"[:_DETAIL_CHARS]
    except Exception:  # a str() that itself fails
        return type(e).__name__


def _run_single(spec: Mapping[str, Any], response: str, ctx: Context) -> Tuple[float, dict]:
    vdef = VERIFIERS.get(spec["verifier"])
    params = spec.get("params") or {}
    try:
        value = vdef.fn(spec.get("answer"), response, params, ctx)
    except Unparsable as e:
        return 0.0, {"status": "unparsable", "detail": str(e)[:_DETAIL_CHARS]}
    except Exception as e:  # a verifier bug must not kill a training run
        return 0.0, {"status": "error", "detail": _short(e)}
    return _clamp(value), {"status": "ok", "detail": ""}


def score_with_info(spec: Any, response: Any, *, progress: float | None = None
                    ) -> Tuple[float, dict]:
    """``(reward in [0, 1], info)``; info has ``status`` (ok | bad_spec | unparsable | error)
    and ``detail``; for a combined spec also ``components``: a list of per-component infos."""
    try:
        validate_spec(spec)
    except ValueError as e:
        return 0.0, {"status": "bad_spec", "detail": str(e)[:_DETAIL_CHARS]}
    except Exception as e:  # e.g. a spec whose keys do not even compare
        return 0.0, {"status": "bad_spec", "detail": _short(e)}
    try:
        response = response_text(response)
    except Exception as e:
        return 0.0, {"status": "unparsable", "detail": _short(e)}
    prog = _clamp(progress) if progress is not None else None
    ctx = Context(progress=prog)
    if "components" not in spec:
        return _run_single(spec, response, ctx)
    total_w, acc, infos = 0.0, 0.0, []
    for comp in spec["components"]:
        w = float(comp.get("weight", 1.0))
        value, info = _run_single(comp, response, ctx)
        info.update(verifier=comp["verifier"], weight=w, reward=value)
        infos.append(info)
        total_w += w
        acc += w * value
    statuses = {i["status"] for i in infos}
    status = "ok" if statuses == {"ok"} else next(s for s in ("error", "unparsable") if s in statuses)
    return _clamp(acc / total_w), {"status": status, "detail": "", "components": infos}


def score(spec: Any, response: Any, *, progress: float | None = None) -> float:
    """Reward in [0, 1] of ``response`` against ``spec``; never raises, never NaN."""
    try:
        return score_with_info(spec, response, progress=progress)[0]
    except Exception:  # belt and braces: the contract is "never raises"
        return 0.0
