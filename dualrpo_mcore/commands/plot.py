"""``dualrpo plot RUN_DIR [RUN_DIR ...] --out DIR``: training curves from the runs' metrics.jsonl.

Draws the paper's figures for any run: accuracy (the verifier's reward) per task over steps
(smoothed; one panel per task plus the overall mean) and self-certainty / entropy over steps, with
every run overlaid (GRPO vs DualRPO when given one of each); and, when the runs evaluated on
held-out data, the held-out accuracy per task and per task and difficulty at the steps evaluated;
and, when the runs' eval_before/eval_after.json carry per-prompt results, the change after RL with its
95% paired bootstrap interval (:mod:`.bootstrap`) and the difference between two runs. A run is labelled by
``--labels``, else by the ``reward_mode`` in its ``config.json`` or first metrics record, else by its
directory name.
matplotlib is imported only when plotting, so ``dualrpo --help`` stays fast.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from dualrpo_mcore.trainer.metrics import HELDOUT, HELDOUT_LEVELS, JSONL_NAME, read_jsonl

ACCURACY_PREFIX = "accuracy/"
HELDOUT_PREFIX = HELDOUT + ACCURACY_PREFIX
LEVELS_PREFIX = HELDOUT_LEVELS + ACCURACY_PREFIX
OVERALL = "all"
ACCURACY_FIGURE = "accuracy_per_task.png"
SELF_CERTAINTY_FIGURE = "self_certainty_entropy.png"
HELDOUT_FIGURE = "heldout_per_task.png"
LEVELS_FIGURE = "heldout_by_difficulty.png"
INTERVAL_FIGURE = "heldout_interval.png"


@dataclass
class Run:
    label: str
    path: str
    records: List[dict]

    def series(self, key: str):
        """(steps, values) of ``key``; steps where it is missing or was logged as null are dropped."""
        steps, values = [], []
        for r in self.records:
            v = r.get(key)
            if isinstance(v, (int, float)) and math.isfinite(v):
                steps.append(r["step"])
                values.append(float(v))
        return steps, values


def smooth(values: Sequence[Optional[float]], window: int) -> List[float]:
    """Trailing moving average: point i is the mean of the finite values among the last
    ``window`` points (i-window+1 .. i); NaN where that span holds none. ``window <= 1`` is identity."""
    if window < 1:
        raise ValueError(f"smoothing window must be >= 1, got {window}")
    out = []
    for i in range(len(values)):
        span = [v for v in values[max(0, i - window + 1): i + 1]
                if v is not None and math.isfinite(v)]
        out.append(sum(span) / len(span) if span else float("nan"))
    return out


def _reward_mode(run_dir: str, records: List[dict]) -> Optional[str]:
    cfg = os.path.join(run_dir, "config.json")
    if os.path.isfile(cfg):
        try:
            with open(cfg, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{cfg}: not readable JSON ({e})") from e
        mode = _find_key(data, "reward_mode")
        if mode:
            return str(mode)
    first = records[0] if records else {}
    return str(first["reward_mode"]) if first.get("reward_mode") else None


def _find_key(tree, key):
    """``key`` anywhere in a nested config (the resolved config is a tree of dataclasses)."""
    if isinstance(tree, dict):
        if key in tree and not isinstance(tree[key], (dict, list)):
            return tree[key]
        for v in tree.values():
            found = _find_key(v, key)
            if found is not None:
                return found
    return None


def load_runs(run_dirs: Sequence[str], labels: Optional[Sequence[str]] = None) -> List[Run]:
    """Read each run's metrics; an error names the file when a run has none."""
    if labels and len(labels) != len(run_dirs):
        raise ValueError(f"--labels has {len(labels)} names for {len(run_dirs)} runs")
    runs = []
    for i, d in enumerate(run_dirs):
        path = os.path.join(d, JSONL_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no metrics file (is {d} a training run directory?)")
        records = [r for r in read_jsonl(path) if isinstance(r, dict) and isinstance(r.get("step"), int)]
        if not records:
            raise ValueError(f"{path}: no step records to plot")
        records.sort(key=lambda r: r["step"])
        label = labels[i] if labels else (_reward_mode(d, records) or os.path.basename(os.path.normpath(d)))
        runs.append(Run(label, d, records))
    if not labels:
        _disambiguate(runs)
    return runs


def _disambiguate(runs: List[Run]) -> None:
    counts = Counter(r.label for r in runs)
    for r in runs:
        if counts[r.label] > 1:
            r.label = f"{r.label} ({os.path.basename(os.path.normpath(r.path))})"


def task_names(runs: Sequence[Run], prefix: str = ACCURACY_PREFIX) -> List[str]:
    """Tasks with a ``<prefix><task>`` curve in any run, sorted, with the overall mean last."""
    tasks = {k[len(prefix):] for r in runs for rec in r.records for k in rec if k.startswith(prefix)}
    return sorted(tasks, key=lambda t: (t == OVERALL, t))


def _draw_panel(ax, runs: Sequence[Run], key: str, window: int, title: str, levels: Sequence[str] = ("",)) -> int:
    """One curve per run (its colour) and level (its line style); ``levels`` are suffixes of ``key``."""
    drawn = 0
    for i, run in enumerate(runs):
        for j, level in enumerate(levels):
            steps, values = run.series(key + level)
            if not steps:
                continue
            color, style = f"C{i % 10}", ("-", "--", ":", "-.")[j % 4]
            label = f"{run.label} {level.strip('/')}".strip()
            if window > 1:
                ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)  # the raw curve, faint
            # held-out evals come every N steps: markers show where the points are
            ax.plot(steps, smooth(values, window), color=color, linestyle=style, label=label, linewidth=1.6,
                    marker="o" if window == 1 else None, markersize=3)
            drawn += 1
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize="small")
    return drawn


def _task_grid(panels: Dict[str, Sequence[str]], runs: Sequence[Run], prefix: str, window: int, ylabel: str,
               path: str) -> str:
    """A grid of panels, one per task (``panels``: task -> the level suffixes to draw in it)."""
    import matplotlib.pyplot as plt

    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, (task, levels) in zip(axes.flat, panels.items()):
        _draw_panel(ax, runs, prefix + task, window, "overall" if task == OVERALL else task, levels)
        ax.set_ylabel(ylabel)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    return _save(fig, path)


def _save(fig, path: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_accuracy(runs: Sequence[Run], out: str, window: int) -> str:
    tasks = task_names(runs)
    if not tasks:
        raise ValueError(f"no '{ACCURACY_PREFIX}<task>' metrics in {', '.join(r.path for r in runs)}")
    return _task_grid({t: ("",) for t in tasks}, runs, ACCURACY_PREFIX, window, "accuracy",
                      os.path.join(out, ACCURACY_FIGURE))


def plot_heldout(runs: Sequence[Run], out: str) -> List[str]:
    """Held-out greedy accuracy per task, and per task and difficulty, at the steps evaluated (no
    smoothing: a few points per run). Nothing when the runs logged no held-out eval."""
    written = []
    tasks = task_names(runs, HELDOUT_PREFIX)
    if tasks:
        written.append(_task_grid({t: ("",) for t in tasks}, runs, HELDOUT_PREFIX, 1, "held-out accuracy",
                                  os.path.join(out, HELDOUT_FIGURE)))
    levels: Dict[str, set] = {}
    for name in task_names(runs, LEVELS_PREFIX):
        task, _, level = name.rpartition("/")
        levels.setdefault(task, set()).add("/" + level)
    if levels:
        written.append(_task_grid({t: sorted(v) for t, v in sorted(levels.items())}, runs, LEVELS_PREFIX, 1,
                                  "held-out accuracy", os.path.join(out, LEVELS_FIGURE)))
    return written


def _interval_panel(ax, results: Dict[str, Dict], title: str) -> None:
    """One point per task and the mean (last) per result, with its interval as an error bar."""
    tasks = sorted({t for r in results.values() for t in r["tasks"]})
    names = tasks + ["mean"]
    width = 0.8 / max(1, len(results))
    for i, (label, r) in enumerate(results.items()):
        rows = [r["tasks"].get(t) for t in tasks] + [r["mean"]]
        xs = [k + (i - (len(results) - 1) / 2) * width for k, row in enumerate(rows) if row]
        shown = [row for row in rows if row]
        delta = [100 * row["delta"] for row in shown]
        err = [[100 * (row["delta"] - row["low"]) for row in shown],
               [100 * (row["high"] - row["delta"]) for row in shown]]
        ax.errorbar(xs, delta, yerr=err, fmt="o", color=f"C{i % 10}", capsize=3, label=label)
    ax.axhline(0.0, color="0.4", linewidth=0.8)
    ax.axvline(len(tasks) - 0.5, color="0.8", linewidth=0.8)  # the mean stands apart from the tasks
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylabel("points")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")


def plot_intervals(runs: Sequence[Run], out: str) -> Optional[str]:
    """Held-out change after RL per task and mean with its 95% paired bootstrap interval (per run), and
    the difference between two runs on the same prompts; from each run's eval_before/eval_after.json
    (the numbers the demo writes to results_*.json: same draws, same seed). None when no run wrote
    per-prompt results."""
    import matplotlib.pyplot as plt

    from dualrpo_mcore.trainer.bootstrap import LEVEL, run_intervals

    found = run_intervals({r.label: r.path for r in runs})
    if not found["rl"]:
        return None
    panels = [(found["rl"], f"held-out change after RL, {100 * LEVEL:g}% paired bootstrap interval")]
    if found["runs"]:
        panels.append((found["runs"], "difference after RL between runs (same prompts)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4), squeeze=False)
    for ax, (results, title) in zip(axes.flat, panels):
        _interval_panel(ax, results, title)
    return _save(fig, os.path.join(out, INTERVAL_FIGURE))


def plot_self_certainty_entropy(runs: Sequence[Run], out: str, window: int) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    drawn = _draw_panel(axes[0], runs, "self_certainty/all", window, "self-certainty")
    drawn += _draw_panel(axes[1], runs, "entropy/all", window, "entropy")
    axes[0].set_ylabel("mean over responses")
    if not drawn:
        plt.close(fig)
        raise ValueError(f"no self_certainty/all or entropy/all metrics in {', '.join(r.path for r in runs)}")
    return _save(fig, os.path.join(out, SELF_CERTAINTY_FIGURE))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories holding metrics.jsonl")
    parser.add_argument("--out", required=True, help="directory for the PNG files")
    parser.add_argument("--smooth", type=int, default=10, help="moving-average window in steps (1 = raw)")
    parser.add_argument("--labels", nargs="+", default=None, help="one legend label per run")


def run(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    try:
        runs = load_runs(args.runs, args.labels)
        os.makedirs(args.out, exist_ok=True)
        written = [plot_accuracy(runs, args.out, args.smooth)]
        try:
            written.append(plot_self_certainty_entropy(runs, args.out, args.smooth))
        except ValueError as e:  # e.g. a GRPO run logged without self-certainty: accuracy still useful
            print(f"dualrpo plot: skipped {SELF_CERTAINTY_FIGURE}: {e}", file=sys.stderr)
        written += plot_heldout(runs, args.out)
        interval = plot_intervals(runs, args.out)
        if interval:
            written.append(interval)
    except (OSError, ValueError) as e:
        print(f"dualrpo plot: error: {e}", file=sys.stderr)
        return 2
    for p in written:
        print(p)
    return 0
