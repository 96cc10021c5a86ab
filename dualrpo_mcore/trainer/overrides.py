"""``--set section.field=value`` on a config tree: the one way a command line changes a config.

``dualrpo train`` applies them to a recipe's :class:`~.rl_config.RLConfig`, ``dualrpo sft`` to the
defaults of :class:`~.sft_config.SFTConfig`. Parsing and rebuilding: docs/design.md §3.7 (a
validated config is never edited). Convenience flags (``--steps``, ``--tp``) are :func:`add_alias`
spellings of a ``--set`` entry, applied in command-line order with them.
Errors name the key and list the choices.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any, Dict, List, Optional, Sequence

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _field_names(node: Any) -> List[str]:
    return [f.name for f in dataclasses.fields(node)]


def _value(node: Any, name: str) -> Any:
    """The field's value; for a config class (a tree built from its defaults), its default."""
    if not isinstance(node, type):
        return getattr(node, name)
    f = {f.name: f for f in dataclasses.fields(node)}[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _parse(key: str, raw: str, current: Any, annotation: str) -> Any:
    text = raw.strip()
    optional = "Optional" in annotation
    if text.lower() in ("none", "null") and (current is None or optional):
        return None
    if current is None and annotation.replace(" ", "") in ("str", "Optional[str]"):
        return raw  # a path or name, even one that reads as a number
    if isinstance(current, int) and not isinstance(current, bool) and annotation in ("float", "Optional[float]"):
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


class _Section(dict):
    """Changes below one dataclass field (as opposed to a dict a field is set to)."""


def _record(cfg: Any, item: str, changes: _Section) -> None:
    """Parse one ``KEY=VALUE`` against ``cfg`` and file it under its path in ``changes``."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. schedule.mini_batches=2")
    names = key.split(".")
    node, into = cfg, changes
    for depth, name in enumerate(names):
        if not dataclasses.is_dataclass(node) or name not in _field_names(node):
            where = ".".join(names[:depth]) or "the config"
            choices = ", ".join(_field_names(node)) if dataclasses.is_dataclass(node) else "none"
            raise ValueError(f"--set {key}: {where} has no field {name!r} (fields: {choices})")
        if depth < len(names) - 1:
            node = _value(node, name)
            into = into.setdefault(name, _Section())
    current = _value(node, names[-1])
    if dataclasses.is_dataclass(current):
        raise ValueError(f"--set {key}: a section, not a value; set one of {', '.join(_field_names(current))}")
    annotation = {f.name: str(f.type) for f in dataclasses.fields(node)}[names[-1]]
    into[names[-1]] = _parse(key, raw, current, annotation)


def _rebuild(node: Any, changes: _Section) -> Any:
    kwargs = {name: _rebuild(_value(node, name), sub) if isinstance(sub, _Section) else sub
              for name, sub in changes.items()}
    return node(**kwargs) if isinstance(node, type) else dataclasses.replace(node, **kwargs)


def apply_overrides(cfg: Any, items: Sequence[str]) -> Any:
    """A new config: ``cfg`` (a config tree, or a config class to build from its defaults) with the
    ``KEY=VALUE`` strings applied in order (a later one wins). ``cfg`` itself is left as it was."""
    changes = _Section()
    for item in items:
        _record(cfg, item, changes)
    if not changes:
        return cfg() if isinstance(cfg, type) else cfg
    return _rebuild(cfg, changes)


def alias_items(aliases: Dict[str, str], values: Dict[str, Any]) -> List[str]:
    """``KEY=VALUE`` items for keyword arguments named in ``aliases`` (name -> dotted path); a None value
    is left out (the recipe's own value stays). JSON spellings keep bools and lists exact."""
    unknown = sorted(set(values) - set(aliases))
    if unknown:
        raise TypeError(f"unknown settings {unknown}; known: {sorted(aliases)} (or --set a dotted path)")
    return [f"{aliases[k]}={v if isinstance(v, str) else json.dumps(v)}" for k, v in values.items() if v is not None]


class _SetAlias(argparse.Action):
    """A flag that is another spelling of ``--set PATH=VALUE``: it appends to the same list, in order."""

    def __init__(self, option_strings, dest, path: str, value: Optional[str] = None, **kwargs):
        self.path, self.value = path, value
        super().__init__(option_strings, dest, nargs=0 if value is not None else None, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, self.dest, None) or [])
        items.append(f"{self.path}={self.value if self.value is not None else values}")
        setattr(namespace, self.dest, items)


def add_set_argument(parser: argparse.ArgumentParser, example: str) -> None:
    """``--set KEY=VALUE`` (repeatable), collected in ``args.overrides`` with the alias flags."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config field by its dotted path, e.g. {example} (repeatable; "
                             f"applied in command-line order with the flags that are aliases of it)")


def add_alias(parser: argparse.ArgumentParser, flag: str, path: str, help: str, *, value: Optional[str] = None,
              metavar: Optional[str] = None) -> None:
    """``flag`` as an alias of ``--set path=VALUE`` (``value``: a switch that always sets that value). The
    value is parsed and checked with the field's type on the config, so errors name ``path``."""
    parser.add_argument(flag, dest="overrides", action=_SetAlias, path=path, value=value, default=argparse.SUPPRESS,
                        metavar=metavar, help=f"{help} (= --set {path}={value if value is not None else '...'})")
