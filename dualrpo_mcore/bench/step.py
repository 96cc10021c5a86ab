"""``dualrpo bench step``: the end-to-end RL step, broken down by phase.

Runs the training loop itself (``trainer.loop.train``) on the ``tiny_cpu`` recipe for ``--steps``
steps and reads the per-phase wall times the loop records in every step's metrics
(``ctx.timer``: ``rollout`` = sampling G responses per prompt, ``verify`` = the verifier pool,
``logprob`` = the actor's forward for old log-probs / self-certainty, ``update`` = the policy update,
``sync`` = weight export into the rollout engine, ``probe`` = the weight-sync guard). Printed: each
phase's seconds (median over the measured steps, the first ``--warmup`` steps excluded), its share of
the measured steps' summed time, and its seconds in every step (also in the JSON). ``other`` is the
run's wall time minus the phases (set-up, the initial weight sync, logging); checkpoints and evaluation
are switched off so they do not land in a step.

The "baseline" here is the step itself: a phase's share says where an RL step's time goes, which is
what the other benches (``rollout``, ``train``, ``weight-sync``) then break down further.
``--engines compare`` runs the loop twice, with one rollout engine on rank 0 (the baseline) and with
an engine on every rank (``rollout.engine_on_every_rank``), and prints the ratios of their medians.
``--set KEY=VALUE`` overrides the recipe (as ``dualrpo train --set`` does); ``--baseline-set KEY=VALUE``
also runs a baseline with those overrides on top and prints baseline / this run, e.g.
``--baseline-set actor.model.dedup_images=false`` measures encoding each image once per batch.

Data: ``--data`` (a ``dualrpo data synth`` directory) or, by default, a small synthetic set written
to a temporary directory first; ``--init`` optionally names the HF directory from ``dualrpo sft``
(otherwise a random tiny policy: a random policy samples to the length cap, the slowest case).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List

PHASES = ("rollout", "verify", "logprob", "update", "sync", "probe")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=None, help="`dualrpo data synth` dir (default: a fresh tiny one)")
    parser.add_argument("--init", default=None, help="initial policy: HF dir from `dualrpo sft` (default: random)")
    parser.add_argument("--steps", type=int, default=3, help="RL steps to run")
    parser.add_argument("--warmup", type=int, default=1, help="first steps left out of the medians")
    parser.add_argument("--prompts-per-step", type=int, default=4, help="prompts per step")
    parser.add_argument("--group-size", type=int, default=4, help="responses per prompt (G)")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="response length cap")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (gloo processes when > 1)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument("--engines", choices=("rank0", "every-rank", "compare"), default="rank0",
                        help="rollout engine on rank 0, on every rank, or both runs and their ratios")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe field by its dotted path; repeatable")
    parser.add_argument("--baseline-set", action="append", default=[], metavar="KEY=VALUE",
                        help="also run a baseline with these overrides (after --set) and print the ratios; "
                             "repeatable")
    parser.add_argument("--json", default=None, help="write results here as JSON")


def check_args(args) -> None:
    for name in ("steps", "prompts_per_step", "group_size", "max_new_tokens", "tp", "pp"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.warmup < args.steps:
        raise ValueError(f"--warmup must lie in [0, --steps) = [0, {args.steps}), got {args.warmup}")
    for flag in ("data", "init"):
        path = getattr(args, flag)
        if path and not os.path.isdir(path):
            raise ValueError(f"--{flag} {path}: not a directory")
    if args.data and not os.path.exists(os.path.join(args.data, "train.parquet")):
        raise ValueError(f"--data {args.data}: no train.parquet (write one with `dualrpo data synth`)")
    if args.baseline_set and args.engines == "compare":
        raise ValueError("--baseline-set and --engines compare are two comparisons: give one")


def synth_data(out: str) -> str:
    """A small synthetic 8-task set (1 train row per task is plenty: prompts are drawn with replacement
    across epochs) with its tokenizer and processor, via the ``dualrpo data synth`` command."""
    cmd = [sys.executable, "-m", "dualrpo_mcore", "data", "synth", "--out", out, "--num-per-task", "2",
           "--heldout-per-task", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return out


def recipe(args, data: str, run_dir: str):
    """The tiny CPU recipe with the bench's sizes; checkpoints and evaluation off; then the overrides."""
    from dualrpo_mcore.trainer.recipes import build_recipe

    sets = ["checkpoint.every=0", "eval.every=0", f"rollout.engine_on_every_rank={args.engines == 'every-rank'}",
            *args.set, *getattr(args, "extra_set", [])]
    return build_recipe("tiny_cpu", data, args.init, run_dir, sets, steps=args.steps, tp=args.tp, pp=args.pp,
                        group_size=args.group_size, prompts_per_step=args.prompts_per_step,
                        max_new_tokens=args.max_new_tokens, progress=True)  # the step bar, rank 0


def _worker(rank: int, world: int, args, data: str, run_dir: str) -> Dict[str, Any]:
    import warnings

    from dualrpo_mcore.trainer.loop import train

    # Spawned ranks do not inherit the parent's filters; Megatron's CPU-path notices drown the output.
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    t0 = time.perf_counter()
    records = train(recipe(args, data, run_dir))
    return dict(records=records, wall_s=time.perf_counter() - t0)


def summarize(records: List[Dict[str, float]], wall_s: float, warmup: int) -> Dict[str, Any]:
    """Per-step phase seconds, the medians over the measured steps, and each phase's share."""
    per_step = [dict(step=int(r["step"]), **{p: float(r.get(f"time/{p}", 0.0)) for p in PHASES},
                     total=float(r.get("time/step", float("nan")))) for r in records]
    measured = per_step[warmup:] or per_step
    median = {p: statistics.median(s[p] for s in measured) for p in PHASES + ("total",)}
    # Shares from the summed time of the measured steps (medians of parts need not add up to the total's).
    summed = sum(s["total"] for s in measured)
    share = {p: sum(s[p] for s in measured) / summed for p in PHASES}
    other = wall_s - sum(s["total"] for s in per_step)
    missing = [p for p in PHASES if not all(f"time/{p}" in r for r in records)]
    return dict(per_step=per_step, median_s=median, share=share, wall_s=wall_s, other_s=other,
                measured_steps=[s["step"] for s in measured], missing_phases=missing)


def print_table(summary: Dict[str, Any], args) -> None:
    print(f"\nRL step  recipe=tiny_cpu tp={args.tp} pp={args.pp} prompts/step={args.prompts_per_step} "
          f"G={args.group_size} max_new_tokens={args.max_new_tokens}; medians over steps "
          f"{summary['measured_steps']}")
    print(f"{'phase':<10}{'median s':>10}{'share':>8}   per step (s); share = of the measured steps' time")
    for p in PHASES + ("total",):
        each = " ".join(f"{s[p]:.2f}" for s in summary["per_step"])
        share = f"{100 * summary['share'][p]:.1f}%" if p in summary["share"] else "100%"
        print(f"{p:<10}{summary['median_s'][p]:>10.3f}{share:>8}   {each}")
    print(f"run wall time {summary['wall_s']:.1f} s, of which outside the steps' phases "
          f"(set-up, initial sync, logging) {summary['other_s']:.1f} s")
    if summary["missing_phases"]:
        print(f"phases missing from some steps: {summary['missing_phases']} (e.g. a step without update)")


def run(args) -> int:
    from dualrpo_mcore.parallel.spawn import run_distributed

    from .common import write_json

    try:
        check_args(args)
    except ValueError as e:
        print(f"dualrpo bench step: {e}")
        return 2
    with tempfile.TemporaryDirectory(prefix="bench_step_") as tmp:
        data = args.data
        if data is None:
            print("bench step: writing a small synthetic data set (dualrpo data synth)", flush=True)
            data = synth_data(os.path.join(tmp, "data"))
        world = args.tp * args.pp
        runs = variants(args)
        try:  # a bad override fails here, before any process starts
            for label, run_args in runs.items():
                recipe(run_args, data, os.path.join(tmp, label))
        except ValueError as e:
            print(f"dualrpo bench step: {e}")
            return 2
        threads = max(1, (os.cpu_count() or 1) // world)
        summaries, results = {}, {}
        for label, run_args in runs.items():
            print(f"bench step: {args.steps} RL steps of tiny_cpu on {world} process(es), engines: "
                  f"{run_args.engines}, overrides: {[*run_args.set, *run_args.extra_set] or 'none'}", flush=True)
            results[label] = run_distributed(_worker, world, run_args, data, os.path.join(tmp, label),
                                             threads=threads, timeout=3600)[0]
            summaries[label] = summarize(results[label]["records"], results[label]["wall_s"], args.warmup)
            print_table(summaries[label], args)
    if len(runs) > 1:
        base, this = runs
        print_ratios(summaries[base], summaries[this], base, this)
    if args.json:
        payload = {p: dict(summary=summaries[p], records=results[p]["records"]) for p in runs}
        write_json(args.json, "step", args, payload if len(runs) > 1 else payload[next(iter(runs))])
    ok = all(math.isfinite(v) and v >= 0 and not sm["missing_phases"]
             for sm in summaries.values() for v in sm["median_s"].values())
    return 0 if ok else 1


def variants(args) -> Dict[str, argparse.Namespace]:
    """The runs to make, by label; with two, the first is the baseline of the ratios."""
    from .common import public_args

    base = dict(public_args(args), extra_set=[])
    if args.engines == "compare":
        return {p: argparse.Namespace(**dict(base, engines=p)) for p in ("rank0", "every-rank")}
    if args.baseline_set:
        return {"baseline": argparse.Namespace(**dict(base, extra_set=list(args.baseline_set))),
                "this": argparse.Namespace(**base)}
    return {args.engines: argparse.Namespace(**base)}


def print_ratios(base: Dict[str, Any], other: Dict[str, Any], base_label: str, other_label: str) -> None:
    """Baseline over the other run, per phase median: > 1 is a speed-up."""
    print(f"\n{other_label} vs {base_label} (baseline); ratio = {base_label} / {other_label}")
    for p in PHASES + ("total",):
        b, e = base["median_s"][p], other["median_s"][p]
        print(f"{p:<10} {base_label} {b:.3f} s   {other_label} {e:.3f} s   ratio {b / e if e > 0 else float('nan'):.2f}x")
