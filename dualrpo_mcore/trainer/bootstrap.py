"""Paired bootstrap intervals of held-out accuracy: how sure a before/after (or run A vs run B) change is.

Both evaluations score the *same* held-out prompts, so the change is measured per prompt
(``new - base``) and the prompts are resampled with replacement, pairs kept together: a prompt the
policy always gets right cancels out instead of adding noise, which an unpaired interval of two
accuracies would not do. Resampling is within each task (stratified), so every resample keeps the
task sizes, and the "mean" is the mean over tasks of the task means, the number the demo reports.
The interval is the percentile interval of the resampled means (numpy's linear quantile), from a
fixed seed, so the same files give the same interval in ``results_*.json`` and in the plots.

Per-prompt results come from the evaluation records :mod:`.evaluation` writes (``eval/step_<k>.json``,
``per_prompt``; copied by the demo's RL stage to ``eval_before.json`` / ``eval_after.json``). Their
``accuracy`` is the verifier's score of the prompt's answer (0/1 for most tasks, a fraction for the
IoU-based ones), or a mean over samples; the bootstrap needs only that it is finite.
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

RESAMPLES, SEED, LEVEL = 10_000, 0, 0.95
PER_PROMPT = "per_prompt"
METHOD = "paired percentile bootstrap over held-out prompts, resampled within each task"
_CHUNK = 1000  # resamples drawn at once: bounds memory at CHUNK x prompts-per-task indices


def load_per_prompt(path: str) -> Optional[Dict[str, Tuple[str, float]]]:
    """``{prompt uid: (task, accuracy)}`` from an eval file, or None when the file has no per-prompt
    results (written before they existed). Bad entries raise ValueError naming the file and entry."""
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not readable JSON ({e})") from e
    rows = data.get(PER_PROMPT) if isinstance(data, dict) else None
    if rows is None:
        return None
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path}: '{PER_PROMPT}' must be a non-empty list of {{uid, task, accuracy}}")
    out: Dict[str, Tuple[str, float]] = {}
    for i, row in enumerate(rows):
        where = f"{path}: {PER_PROMPT}[{i}]"
        if not isinstance(row, dict) or not {"uid", "task", "accuracy"} <= set(row):
            raise ValueError(f"{where}: needs the keys uid, task, accuracy; got {row!r}")
        c = row["accuracy"]
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c):
            raise ValueError(f"{where}: accuracy must be a finite number, got {c!r}")
        pid = str(row["uid"])
        if pid in out:
            raise ValueError(f"{where}: prompt id {pid!r} appears twice")
        out[pid] = (str(row["task"]), float(c))
    return out


def pair(base: Mapping[str, Tuple[str, float]], new: Mapping[str, Tuple[str, float]], base_name: str = "base",
         new_name: str = "new") -> Tuple[List[str], np.ndarray, np.ndarray]:
    """(tasks, base correct, new correct) over the prompts both scored, in one order. Pairing needs
    the same prompts: a different set or a prompt filed under two tasks raises ValueError."""
    if set(base) != set(new):
        only_b, only_n = sorted(set(base) - set(new)), sorted(set(new) - set(base))
        raise ValueError(f"{base_name} and {new_name} scored different held-out prompts: {len(only_b)} only in "
                         f"{base_name} (e.g. {only_b[:3]}), {len(only_n)} only in {new_name} (e.g. {only_n[:3]})")
    ids = sorted(base)
    bad = [i for i in ids if base[i][0] != new[i][0]]
    if bad:
        raise ValueError(f"prompt {bad[0]!r} is task {base[bad[0]][0]!r} in {base_name} but "
                         f"{new[bad[0]][0]!r} in {new_name}")
    return ([base[i][0] for i in ids], np.array([base[i][1] for i in ids], dtype=np.float64),
            np.array([new[i][1] for i in ids], dtype=np.float64))


def _percentile(samples: np.ndarray, level: float) -> Tuple[float, float]:
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(samples, [tail, 1.0 - tail])
    return float(low), float(high)


def paired_interval(tasks: Sequence[str], base: Sequence[float], new: Sequence[float], *,
                    resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> Dict:
    """The paired bootstrap of ``new - base`` per task and for the mean over tasks.

    Returns ``{"tasks": {task: {n, base, new, delta, low, high}}, "mean": {base, new, delta, low,
    high}, "resamples", "seed", "level", "method"}``, accuracies as fractions. ``low``/``high`` bound
    ``delta`` at ``level``. One generator draws every stratum in a fixed order (tasks sorted), so a
    given input and seed always give the same interval."""
    base, new = np.asarray(base, dtype=np.float64), np.asarray(new, dtype=np.float64)
    tasks = [str(t) for t in tasks]
    if not (len(tasks) == base.shape[0] == new.shape[0]) or not tasks:
        raise ValueError(f"paired_interval needs one task, base and new value per prompt; got {len(tasks)} tasks, "
                         f"{base.shape[0]} base and {new.shape[0]} new values")
    if resamples < 1 or not 0.0 < level < 1.0:
        raise ValueError(f"resamples must be >= 1 and level in (0, 1); got {resamples}, {level}")
    if not (np.isfinite(base).all() and np.isfinite(new).all()):
        raise ValueError("paired_interval: base and new must be finite (a prompt that failed scores 0)")
    rng = np.random.default_rng(seed)
    names = sorted(set(tasks))
    index = {t: np.flatnonzero(np.array(tasks) == t) for t in names}
    boot = {t: np.empty(resamples) for t in names}
    for start in range(0, resamples, _CHUNK):
        b = min(_CHUNK, resamples - start)
        for t in names:
            d = new[index[t]] - base[index[t]]
            draws = rng.integers(0, d.shape[0], size=(b, d.shape[0]))
            boot[t][start:start + b] = d[draws].mean(axis=1)
    out: Dict = dict(tasks={}, resamples=resamples, seed=seed, level=level, method=METHOD)
    for t in names:
        low, high = _percentile(boot[t], level)
        mb, mn = float(base[index[t]].mean()), float(new[index[t]].mean())
        out["tasks"][t] = dict(n=int(index[t].shape[0]), base=mb, new=mn, delta=mn - mb, low=low, high=high)
    mean_boot = np.mean([boot[t] for t in names], axis=0)
    low, high = _percentile(mean_boot, level)
    mb = float(np.mean([r["base"] for r in out["tasks"].values()]))
    mn = float(np.mean([r["new"] for r in out["tasks"].values()]))
    out["mean"] = dict(base=mb, new=mn, delta=mn - mb, low=low, high=high)
    return out


def _eval_pair(run_dir: str) -> Optional[Tuple[Dict, Dict]]:
    paths = [os.path.join(run_dir, f"eval_{w}.json") for w in ("before", "after")]
    if not all(os.path.isfile(p) for p in paths):
        return None
    before, after = (load_per_prompt(p) for p in paths)
    return None if before is None or after is None else (before, after)


def run_intervals(runs: Mapping[str, str], *, resamples: int = RESAMPLES, seed: int = SEED,
                  level: float = LEVEL) -> Dict:
    """Intervals for runs given as ``{label: run_dir}`` (the demo's labels are reward modes).

    ``{"rl": {label: paired_interval(before -> after)}, "runs": {"A - B": paired_interval(B after ->
    A after)}}``; a run without per-prompt eval files is left out. Two runs are compared when both
    have them, in the order given (the demo passes DualRPO first, so the difference is DualRPO - GRPO)."""
    per_run = {label: p for label, d in runs.items() if (p := _eval_pair(d)) is not None}
    out: Dict = dict(rl={}, runs={})
    for label, (before, after) in per_run.items():
        tasks, b, a = pair(before, after, f"{label} eval_before.json", f"{label} eval_after.json")
        out["rl"][label] = paired_interval(tasks, b, a, resamples=resamples, seed=seed, level=level)
    labels = list(per_run)
    for i, first in enumerate(labels):
        for second in labels[i + 1:]:
            tasks, b, a = pair(per_run[second][1], per_run[first][1], f"{second} eval_after.json",
                               f"{first} eval_after.json")
            out["runs"][f"{first} - {second}"] = paired_interval(tasks, b, a, resamples=resamples, seed=seed,
                                                                 level=level)
    return out


def describe(interval: Mapping, scale: float = 100.0) -> str:
    """``+2.4 [+0.9, +3.8]`` (points, by default) of an interval's mean or task entry."""
    if any(not math.isfinite(interval[k]) for k in ("delta", "low", "high")):
        return "n/a"
    return f"{scale * interval['delta']:+.1f} [{scale * interval['low']:+.1f}, {scale * interval['high']:+.1f}]"
