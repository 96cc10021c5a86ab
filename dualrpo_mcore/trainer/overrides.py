"""``--set section.field=value`` on a config tree (``dualrpo train --set schedule.mini_batches=2``).

A value is parsed by the type the field holds now (bool, int, float, str; JSON for lists, dicts
and fields that are None), and every dataclass on the path is checked again afterwards, so a bad
value fails with the same message a recipe would get. Errors name the key and list the choices.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, List, Sequence

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _field_names(node: Any) -> List[str]:
    return [f.name for f in dataclasses.fields(node)]


def _parse(key: str, raw: str, current: Any, annotation: str) -> Any:
    text = raw.strip()
    if text.lower() in ("none", "null") and (current is None or "Optional" in annotation):
        return None
    if isinstance(current, int) and not isinstance(current, bool) and annotation == "float":
        current = float(current)  # a float field that a recipe filled with an int
    if isinstance(current, bool):
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise ValueError(f"--set {key}: {raw!r} is not a boolean (true/false)")
    try:
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
    except ValueError:
        raise ValueError(f"--set {key}: {raw!r} is not a {type(current).__name__}") from None
    if isinstance(current, str):
        return raw
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        if current is None:
            return raw  # an unset optional path or name
        raise ValueError(f"--set {key}: {raw!r} is not JSON for a {type(current).__name__}") from None
    if current is not None and not isinstance(value, type(current)):
        raise ValueError(f"--set {key}: expected a {type(current).__name__}, got {type(value).__name__}")
    return value


def apply_overrides(cfg: Any, items: Sequence[str]) -> Any:
    """Apply ``KEY=VALUE`` strings to the dataclass tree ``cfg`` in place; returns ``cfg``."""
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. schedule.mini_batches=2")
        path = [cfg]
        names = key.split(".")
        for depth, name in enumerate(names):
            node = path[-1]
            if not dataclasses.is_dataclass(node) or name not in _field_names(node):
                where = ".".join(names[:depth]) or "the config"
                choices = ", ".join(_field_names(node)) if dataclasses.is_dataclass(node) else "none"
                raise ValueError(f"--set {key}: {where} has no field {name!r} (fields: {choices})")
            if depth < len(names) - 1:
                path.append(getattr(node, name))
        current = getattr(path[-1], names[-1])
        if dataclasses.is_dataclass(current):
            raise ValueError(f"--set {key}: a section, not a value; set one of {', '.join(_field_names(current))}")
        annotation = {f.name: str(f.type) for f in dataclasses.fields(path[-1])}[names[-1]]
        setattr(path[-1], names[-1], _parse(key, raw, current, annotation))
        for node in reversed(path):  # inner checks first; the root's derive from them
            post = getattr(node, "__post_init__", None)
            if post is not None:
                post()
    return cfg
