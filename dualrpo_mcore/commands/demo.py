"""``dualrpo demo`` (``make demo``): the tiny CPU demo end to end.

Its stages (synth, SFT, RL under ``torchrun`` via :mod:`.demo_rl`, plot, the before/after table
with :mod:`.bootstrap` intervals): docs/demo.md, "What it runs". Each is a subprocess, so every one
runs exactly as a user would run it by hand.

``--resume`` skips the stages whose outputs exist (and continues an interrupted RL stage from its
newest checkpoint). Data and warm start are shared by the reward modes of one ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List

TASK_ORDER = ("math", "science", "chart", "ocr", "counting", "puzzle", "detection", "grounding")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="outputs/demo",
                        help="output directory (data/, run_<mode>/, hf_<mode>/, plots/)")
    parser.add_argument("--reward-mode", default="dualrpo", choices=("dualrpo", "grpo"),
                        help="DualRPO, or plain GRPO for comparison")
    parser.add_argument("--time-budget-min", type=float, default=15.0,
                        help="wall-clock budget of the whole demo in minutes; the RL steps stop in time for it")
    parser.add_argument("--resume", action="store_true", help="skip stages whose outputs exist")
    parser.add_argument("--seed", type=int, default=0)
    # The defaults below were chosen by measurement: docs/demo.md, "Why the demo's defaults are what they are".
    g = parser.add_argument_group("data and warm start")
    from dualrpo_mcore.data.synth import LAYOUTS

    g.add_argument("--layout", default="grid", choices=tuple(LAYOUTS),
                   help="synthetic layout: grid (objects on the tiny policy's token grid) or free")
    g.add_argument("--num-per-task", type=int, default=2000, help="synthetic train samples per task")
    g.add_argument("--heldout-per-task", type=int, default=256, help="held-out samples per task")
    g.add_argument("--sft-steps", type=int, default=2000)
    g.add_argument("--sft-lr", type=float, default=2e-3)
    g.add_argument("--sft-batch-size", type=int, default=8, help="rows per update per process")
    g.add_argument("--no-packing", dest="packing", action="store_false",
                   help="padded [B, S] micro-batches instead of packed streams in the warm start and RL "
                        "(= dualrpo sft --no-packing and --set actor.model.packing=false)")
    g = parser.add_argument_group("RL")
    g.add_argument("--steps", type=int, default=2000,
                   help="upper bound on RL steps (the time budget usually ends first)")
    g.add_argument("--nproc", type=int, default=2, help="torchrun processes")
    g.add_argument("--tp", type=int, default=2, help="tensor-parallel size")
    g.add_argument("--lr", type=float, default=2e-4, help="RL learning rate")
    g.add_argument("--group-size", type=int, default=4, help="G: samples per prompt")
    g.add_argument("--prompts-per-step", type=int, default=16)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=1.0, help="rollout sampling temperature")
    g.add_argument("--no-dynamic-sampling", dest="dynamic_sampling", action="store_false",
                   help="keep groups whose verifier rewards are all equal (default: drop and refill them)")
    g.add_argument("--eval-every", type=int, default=100, help="held-out eval every N RL steps (curves)")
    g.add_argument("--one-engine", dest="engine_on_every_rank", action="store_false",
                   help="one rollout engine on rank 0 (default: one per process, each generating a share)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the RL stage's config by its dotted path (see run_<mode>/config.json), "
                        "e.g. --set actor.loss.agg=seq-mean; repeatable")
    g.add_argument("--reserve-s", type=float, default=45.0,
                   help="seconds kept back from the budget for the final eval, export, plots")


def _env() -> Dict[str, str]:
    # Offline: the demo needs nothing from the network; one thread per rank: 2 ranks on 2 cores.
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), TOKENIZERS_PARALLELISM="false")


def _stage(name: str, cmd: List[str], log_path: str, timings: Dict[str, float]) -> None:
    """Run one stage's command, output to ``log_path`` and the lines that matter to the console."""
    print(f"[demo] {name}: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
        for line in proc.stdout:
            log.write(line)
            if line.startswith(("demo rl:", "sft:", "train:", "wrote ", "Traceback")) or "Error" in line:
                print(f"[demo]   {line.rstrip()}", flush=True)
        rc = proc.wait()
    timings[name] = time.time() - t0
    if rc != 0:
        with open(log_path) as f:
            tail = f.read()[-4000:]
        raise RuntimeError(f"stage {name!r} failed (exit {rc}); log {log_path}; tail:\n{tail}")
    print(f"[demo] {name}: done in {timings[name]:.1f}s", flush=True)


def _dualrpo(*args: str) -> List[str]:
    return [sys.executable, "-m", "dualrpo_mcore", *args]


def _sft_command(args, data: str) -> List[str]:
    """Data parallel over the demo's processes: one thread each, so both cores work (1.4x one process)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
            "-m", "dualrpo_mcore", "sft", "--data", data, "--out", os.path.join(data, "sft"), "--steps",
            str(args.sft_steps), "--lr", str(args.sft_lr), "--batch-size", str(args.sft_batch_size),
            "--seed", str(args.seed), "--no-progress"] + ([] if args.packing else ["--no-packing"])


def rl_overrides(args) -> List[str]:
    """The driver's RL flags as ``--set`` items on the ``tiny_cpu`` recipe (the demo's defaults differ
    from the recipe's: a longer budget, more prompts per step); the user's ``--set`` items come last."""
    seed = args.seed
    items = [f"reward.mode={args.reward_mode}", f"schedule.steps={args.steps}", f"actor.parallel.tp={args.tp}",
             f"actor.optim.lr={args.lr}", f"rollout.group_size={args.group_size}",
             f"schedule.prompts_per_step={args.prompts_per_step}",
             f"rollout.sampling.max_new_tokens={args.max_new_tokens}",
             f"rollout.sampling.temperature={args.temperature}",
             f"eval.every={args.eval_every or args.steps}", f"eval.max_samples={8 * args.heldout_per_task}",
             f"schedule.dynamic_sampling={args.dynamic_sampling}",
             f"rollout.engine_on_every_rank={args.engine_on_every_rank}",
             # The recipe derives its seeds from one number; the demo's --seed sets the same three.
             f"data.seed={seed}", f"rollout.seed={seed}", f"actor.seed={seed + 1234}"]
    items += [] if args.packing else ["actor.model.packing=false"]
    return items + list(args.set)


def _rl_command(args, data: str, run_dir: str, hf_dir: str, deadline: float) -> List[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
           "-m", "dualrpo_mcore.commands.demo_rl", "--data", data, "--init", os.path.join(data, "sft"),
           "--out", run_dir, "--hf-out", hf_dir, "--deadline", f"{deadline:.1f}", "--no-progress",
           *[a for item in rl_overrides(args) for a in ("--set", item)]]
    if args.resume:
        cmd.append("--resume")
    return cmd


def results_table(before: Dict[str, float], after: Dict[str, float]) -> Dict:
    """Per-task before/after/delta, in percent; the mean is over tasks present in both."""
    tasks = [t for t in TASK_ORDER if t in before and t in after]
    tasks += sorted(t for t in before if t in after and t not in tasks and t != "all")
    rows = {t: dict(before=100 * before[t], after=100 * after[t], delta=100 * (after[t] - before[t])) for t in tasks}
    mb = sum(r["before"] for r in rows.values()) / max(1, len(rows))
    ma = sum(r["after"] for r in rows.values()) / max(1, len(rows))
    return dict(tasks=rows, mean_before=mb, mean_after=ma, mean_delta=ma - mb)


def difficulty_table(before: Dict[str, float], after: Dict[str, float]) -> Dict[str, Dict[str, float]]:
    """``{"<task>/d<k>": {before, after}}`` in percent, tasks in the demo's order, for the split present in
    both evals (an eval written before the split existed has none)."""
    order = {t: i for i, t in enumerate(TASK_ORDER)}

    def key(name: str):
        task, _, level = name.rpartition("/")
        return order.get(task, len(order)), task, level

    return {k: dict(before=100 * before[k], after=100 * after[k]) for k in sorted(set(before) & set(after), key=key)}


def intervals_table(out: str, mode: str) -> Dict:
    """95% paired bootstrap intervals (percentage points) of this run's before -> after change and, when
    the other reward mode's run sits beside it, of DualRPO's "after" minus GRPO's on the same prompts.
    ``{"available": False, "reason": ...}`` when the eval files carry no per-prompt results or do not pair:
    the table is still worth printing without them."""
    from dualrpo_mcore.trainer.bootstrap import run_intervals

    # DualRPO first, so a comparison reads DualRPO - GRPO whichever mode this invocation ran.
    runs = {m: os.path.join(out, f"run_{m}") for m in ("dualrpo", "grpo") if m == mode or
            os.path.isfile(os.path.join(out, f"run_{m}", "eval_after.json"))}
    try:
        found = run_intervals(runs)
    except (OSError, ValueError) as e:
        return dict(available=False, reason=str(e))
    if mode not in found["rl"]:
        return dict(available=False, reason=f"{runs[mode]}: eval_before.json / eval_after.json have no per-prompt "
                                            "results")
    rl = found["rl"][mode]
    return dict(available=True, level=rl["level"], resamples=rl["resamples"], seed=rl["seed"], method=rl["method"],
                rl={m: _points(r, "before", "after") for m, r in found["rl"].items()},
                runs={k: _points(r, *reversed(k.split(" - "))) for k, r in found["runs"].items()})


def _points(interval: Dict, base: str, new: str) -> Dict:
    """A bootstrap result in percentage points, as the before/after table is, its two accuracies named
    (``before``/``after``, or the two reward modes); ``delta`` = new - base, bounded by ``low``/``high``."""
    names = dict(base=base, new=new)

    def scale(row: Dict) -> Dict:
        return {names.get(k, k): (v if k == "n" else 100 * v) for k, v in row.items()}

    return dict(tasks={t: scale(r) for t, r in interval["tasks"].items()}, mean=scale(interval["mean"]))


def _ci(row: Dict) -> str:
    return f"[{row['low']:+5.1f}, {row['high']:+5.1f}]"


def print_intervals(table: Dict, mode: str) -> None:
    """Under the table (which shows this run's intervals per task): how they were made, then the
    difference between the reward modes when both ran."""
    iv = table.get("intervals") or {}
    if not iv.get("available"):
        print(f"(no interval: {iv.get('reason', 'not computed')})", flush=True)
        return
    level = f"{100 * iv['level']:g}%"
    print(f"{level} intervals: {iv['method']} ({iv['resamples']} resamples, seed {iv['seed']}); "
          "one that holds 0 did not separate the change from the noise")
    for name, r in iv["runs"].items():
        separated = r["mean"]["low"] > 0 or r["mean"]["high"] < 0
        print(f"{name.upper()} after RL, same prompts (points): mean {r['mean']['delta']:+.1f} {_ci(r['mean'])}, "
              f"{'separated' if separated else 'not separated'} at {level}")
        print("  " + "  ".join(f"{t} {x['delta']:+.1f} {_ci(x)}" for t, x in r["tasks"].items()))
    sys.stdout.flush()


def print_table(table: Dict, mode: str) -> None:
    print(f"\nHeld-out accuracy (%), warm start -> after {mode.upper()}:")
    iv = table.get("intervals") or {}
    rl = iv["rl"][mode] if iv.get("available") else None
    ci = f"  {100 * iv['level']:g}% interval" if rl else ""
    print(f"  {'task':<10} {'before':>7} {'after':>7} {'delta':>7}{ci}")
    for t, r in table["tasks"].items():
        cell = f"  {_ci(rl['tasks'][t])}" if rl and t in rl["tasks"] else ""
        print(f"  {t:<10} {r['before']:7.1f} {r['after']:7.1f} {r['delta']:+7.1f}{cell}")
    cell = f"  {_ci(rl['mean'])}" if rl else ""
    print(f"  {'mean':<10} {table['mean_before']:7.1f} {table['mean_after']:7.1f} {table['mean_delta']:+7.1f}{cell}",
          flush=True)
    split: Dict[str, Dict[str, Dict[str, float]]] = {}
    for name, r in table.get("by_difficulty", {}).items():
        task, _, level = name.rpartition("/")
        split.setdefault(task, {})[level] = r
    if split:
        print("By difficulty (%), before -> after:")
        for task, levels in split.items():
            cells = "  ".join(f"{lv} {r['before']:5.1f} -> {r['after']:5.1f}" for lv, r in sorted(levels.items()))
            print(f"  {task:<10} {cells}")
    sys.stdout.flush()


def _check_rl_config(rl_cmd: List[str]) -> None:
    """Build the RL stage's config here, so a bad ``--set`` fails now and not after minutes of SFT."""
    from dualrpo_mcore.commands import demo_rl

    argv = rl_cmd[rl_cmd.index("dualrpo_mcore.commands.demo_rl") + 1:]
    try:
        demo_rl.build_config(demo_rl.parse_args(argv))
    except ValueError as e:
        raise RuntimeError(f"the RL stage would refuse its config: {e}") from None


def _check_out(args) -> str | None:
    if args.resume or not os.path.isdir(args.out) or not os.listdir(args.out):
        return None
    return f"{args.out} exists and is not empty: pass --resume to continue it, or choose a new --out"


def run_stages(args, t_start: float) -> Dict:
    """Every stage in order; returns the results dict (also written to ``results_<mode>.json``)."""
    out, timings = os.path.abspath(args.out), {}
    data, logs = os.path.join(out, "data"), os.path.join(out, "logs")
    run_dir, hf_dir = os.path.join(out, f"run_{args.reward_mode}"), os.path.join(out, f"hf_{args.reward_mode}")
    os.makedirs(logs, exist_ok=True)
    if not os.path.exists(os.path.join(data, "heldout.parquet")):
        _stage("synth", _dualrpo("data", "synth", "--out", data, "--num-per-task", str(args.num_per_task),
                                 "--heldout-per-task", str(args.heldout_per_task), "--seed", str(args.seed),
                                 "--layout", args.layout),
               os.path.join(logs, "synth.log"), timings)
    after = os.path.join(run_dir, "eval_after.json")
    rl_needed = not (args.resume and os.path.exists(after) and os.path.isdir(hf_dir))
    if rl_needed and args.set:
        _check_rl_config(_rl_command(args, data, run_dir, hf_dir, deadline=0.0))
    if not os.path.exists(os.path.join(data, "sft", "config.json")):
        _stage("sft", _sft_command(args, data), os.path.join(logs, "sft.log"), timings)
    if rl_needed:
        deadline = t_start + 60 * args.time_budget_min - args.reserve_s
        print(f"[demo] rl: {args.reward_mode} steps until {time.strftime('%H:%M:%S', time.localtime(deadline))} "
              f"(budget {args.time_budget_min:g} min from the start)", flush=True)
        _stage("rl", _rl_command(args, data, run_dir, hf_dir, deadline),
               os.path.join(logs, f"rl_{args.reward_mode}.log"), timings)
    runs = [os.path.join(out, d) for d in sorted(os.listdir(out))
            if d.startswith("run_") and os.path.exists(os.path.join(out, d, "metrics.jsonl"))]
    _stage("plot", _dualrpo("plot", *runs, "--out", os.path.join(out, "plots"), "--smooth", "5"),
           os.path.join(logs, "plot.log"), timings)
    with open(os.path.join(run_dir, "eval_before.json")) as f:
        before_json = json.load(f)
    with open(after) as f:
        after_json = json.load(f)
    table = results_table(before_json["accuracy"], after_json["accuracy"])
    table["by_difficulty"] = difficulty_table(before_json.get("by_difficulty", {}), after_json.get("by_difficulty", {}))
    table.update(reward_mode=args.reward_mode, rl_steps=after_json["step"], stage_seconds=timings,
                 total_seconds=time.time() - t_start, hf_dir=hf_dir, run_dir=run_dir, plots=os.path.join(out, "plots"))
    table["intervals"] = intervals_table(out, args.reward_mode)
    with open(os.path.join(out, f"results_{args.reward_mode}.json"), "w") as f:
        json.dump(table, f, indent=2)
    return table


def run(args) -> int:
    problem = _check_out(args)
    if problem is None and args.nproc % args.tp:
        problem = f"--nproc {args.nproc} must be a multiple of --tp {args.tp}"
    if problem:
        print(f"dualrpo demo: {problem}", file=sys.stderr)
        return 2
    t_start = time.time()
    try:
        table = run_stages(args, t_start)
    except RuntimeError as e:
        print(f"dualrpo demo: {e}", file=sys.stderr)
        return 1
    print_table(table, args.reward_mode)
    print_intervals(table, args.reward_mode)
    stages = ", ".join(f"{k} {v:.0f}s" for k, v in table["stage_seconds"].items())
    print(f"\n[demo] {table['rl_steps']} RL steps; total {table['total_seconds']:.0f}s ({stages})")
    print(f"[demo] policy: {table['hf_dir']}  plots: {table['plots']}  "
          f"results: {os.path.join(args.out, 'results_' + args.reward_mode + '.json')}", flush=True)
    from dualrpo_mcore.commands.plot import INTERVAL_FIGURE

    figure = os.path.join(table["plots"], INTERVAL_FIGURE)
    if os.path.isfile(figure):
        print(f"[demo] the intervals drawn: {figure}", flush=True)
    return 0
