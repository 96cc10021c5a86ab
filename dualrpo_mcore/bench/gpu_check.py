"""The one prepared GPU check (``scripts/gpu_check.sh``): every GPU path of the project in one short run.

Device time is lent in minutes, so the whole check is planned to fit one H100 in 8 minutes. Stages:

* ``tests-gpu``   ``pytest tests/gpu``: the CUDA kernel against float64, FP8 Qwen steps, real SGLang;
* ``kernel``      ``dualrpo bench token-stats --device cuda``: the fused kernel against the naive chain
                  and against Megatron's fused cross-entropy plus a separate entropy pass, with achieved
                  bandwidth as % of a copy measured in the same run (the roofline table);
* ``fused-head``  ``dualrpo bench token-stats --fused-head --device cuda``: the fused output head
                  (and its loss path) against output layer + kernel: time and peak memory ratios;
* ``train-bf16``  ``dualrpo bench train --model small`` in bf16 (TE spec where TE imports, else the
                  local spec), tokens/s and MFU;
* ``train-fp8``   the same step in FP8 (needs Transformer Engine);
* ``sglang-rl``   SGLang colocated: tiny data, a 2-update SFT warm start exported to HF, then RL steps
                  through the real loop: sync, the weight-sync probe, one measured step (needs sglang).

A stage whose package does not import is recorded as skipped with the reason; nothing is faked.
Each stage has its own time limit, and the check stops starting stages once the overall budget is
spent. The result (device, commit, package versions, every stage's command, status, seconds and
output tail, and the JSON each bench wrote) goes to ``benchmarks/results/gpu_check_<date>.json``.

``--dry-run`` (CPU, CI): prints the plan and checks what it can without a GPU: every ``dualrpo``
command of the plan parses with the real argument parsers, ``tests/gpu`` collects, the availability
probes run, and the result file is written (``dry_run: true``) to ``--out``.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

BUDGET_S = 480  # one H100, 8 minutes: set-up (wheels, the CUDA build) and every stage
SETUP_S = 95  # the share kept for set-up; scripts/gpu_check.sh measures what it really took


@dataclass
class Stage:
    name: str
    commands: List[List[str]]
    """Run in order; the last one's ``--json`` output (if any) is attached to the result."""
    limit_s: int
    needs: tuple = ()
    """Of ``cuda``, ``te``, ``sglang``."""
    json_out: Optional[str] = None
    cpu_prefix: int = 0
    """How many leading commands also run on a CPU: ``--dry-run`` runs them for real."""


def available() -> Dict[str, Optional[str]]:
    """What this machine can run: None if usable, else the reason why not."""
    out: Dict[str, Optional[str]] = {}
    try:
        import torch

        out["cuda"] = None if torch.cuda.is_available() else "no CUDA device visible to torch"
    except ImportError as e:
        out["cuda"] = f"torch does not import: {e}"
    from dualrpo_mcore.models.qwen2_5_vl.precision import te_available

    out["te"] = None if te_available() else "transformer_engine.pytorch does not import (pip install dualrpo-mcore[te])"
    out["sglang"] = (None if importlib.util.find_spec("sglang") is not None
                     else "sglang is not installed (pip install dualrpo-mcore[sglang])")
    return out


def plan(work: str, have: Dict[str, Optional[str]]) -> List[Stage]:
    py = [sys.executable, "-m", "dualrpo_mcore"]
    spec = "te" if have.get("te") is None else "local"
    data, sft = os.path.join(work, "data"), os.path.join(work, "sft")
    train = py + ["bench", "train", "--model", "small", "--precision", "bf16", "--spec", spec, "--rows", "8",
                  "--prompt-len", "256", "--response-len", "768", "--image", "28x28", "--iters", "5",
                  "--warmup", "2", "--no-baseline"]
    j = lambda name: os.path.join(work, f"{name}.json")  # noqa: E731
    return [
        Stage("tests-gpu", [[sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/gpu"]],
              110, ("cuda",)),
        Stage("kernel", [py + ["bench", "token-stats", "--device", "cuda", "--repeats", "3", "--json", j("kernel")]],
              30, ("cuda",), j("kernel")),
        Stage("fused-head", [py + ["bench", "token-stats", "--fused-head", "--device", "cuda", "--head-tokens", "4096",
                                   "16384", "--repeats", "2", "--json", j("fused-head")]], 25, ("cuda",), j("fused-head")),
        Stage("train-bf16", [train + ["--json", j("train-bf16")]], 50, ("cuda",), j("train-bf16")),
        Stage("train-fp8", [train + ["--fp8", "hybrid", "--json", j("train-fp8")]], 50, ("cuda", "te"), j("train-fp8")),
        Stage("sglang-rl", [
            py + ["data", "synth", "--out", data, "--num-per-task", "2", "--heldout-per-task", "1"],
            py + ["sft", "--data", data, "--out", sft, "--steps", "2", "--no-progress"],
            py + ["bench", "step", "--data", data, "--init", sft, "--steps", "2", "--warmup", "1",
                  "--set", "rollout.engine=sglang", "--set", "actor.model.precision=bf16",
                  "--set", 'rollout.engine_options={"mem_fraction_static": 0.3}', "--json", j("sglang-rl")]],
              120, ("cuda", "sglang"), j("sglang-rl"), cpu_prefix=2),
    ]


def versions() -> Dict[str, Optional[str]]:
    from importlib import metadata

    out: Dict[str, Optional[str]] = {"python": platform.python_version()}
    for dist in ("torch", "megatron-core", "transformers", "transformer-engine", "transformer_engine_torch",
                 "sglang", "dualrpo-mcore"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    with contextlib.suppress(Exception):  # versions are a record, not a requirement
        import torch

        out["cuda"] = torch.version.cuda
        out["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return out


def _commit() -> Optional[str]:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "") if sha else None
    except (OSError, subprocess.SubprocessError):
        return None


def run_stage(stage: Stage, deadline: float) -> Dict:
    rec: Dict = dict(commands=[shlex.join(c) for c in stage.commands], limit_s=stage.limit_s)
    t0, tail = time.time(), ""
    for cmd in stage.commands:
        left = min(stage.limit_s - (time.time() - t0), deadline - time.time())
        if left < 5:
            rec.update(status="timeout", reason="stage or overall budget spent")
            break
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=left)
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"") + (e.stderr or b"")
            tail = (out.decode(errors="replace") if isinstance(out, bytes) else out)[-4000:]
            rec.update(status="timeout", reason=f"{shlex.join(cmd)} ran past {left:.0f} s")
            break
        tail = (proc.stdout + proc.stderr)[-4000:]
        if proc.returncode:
            rec.update(status="failed", reason=f"{shlex.join(cmd)} exited {proc.returncode}")
            break
    else:
        rec["status"] = "passed"
    rec.update(seconds=round(time.time() - t0, 1), output_tail=tail)
    if stage.json_out and os.path.exists(stage.json_out):
        with open(stage.json_out) as f:
            rec["result"] = json.load(f)
    return rec


def dry_check(stage: Stage) -> Dict:
    """Parse every ``dualrpo`` command of the stage with the real parsers, run its CPU prefix for real,
    build the RL config of a ``bench step`` (so every ``--set`` is validated), collect tests/gpu."""
    from dualrpo_mcore.cli import build_parser

    problems = []
    for i, cmd in enumerate(stage.commands):
        if i < stage.cpu_prefix:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if proc.returncode:
                problems.append(f"{shlex.join(cmd)} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-2000:]}")
                break
            continue
        if cmd[1:3] == ["-m", "dualrpo_mcore"]:
            try:
                args = build_parser().parse_args(cmd[3:])
            except SystemExit as e:
                problems.append(f"{shlex.join(cmd[3:])}: rejected by the parser (exit {e.code})")
                continue
            if cmd[3:5] == ["bench", "step"]:
                problems += _check_step_config(args)
        elif cmd[1:3] == ["-m", "pytest"]:
            proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                   cmd[-1]], capture_output=True, text=True, timeout=120)
            if proc.returncode not in (0, 5):
                problems.append(f"collecting {cmd[-1]} failed:\n{(proc.stdout + proc.stderr)[-2000:]}")
    return dict(commands=[shlex.join(c) for c in stage.commands], limit_s=stage.limit_s,
                status="parsed" if not problems else "broken", problems=problems)


def _check_step_config(args) -> List[str]:
    """Build the RL config a ``bench step`` command would run (recipe plus its ``--set``s)."""
    import tempfile

    from .step import recipe

    try:
        recipe(args, args.data, tempfile.mkdtemp(prefix="gpu_check_cfg_"))
    except (ValueError, TypeError, KeyError, FileNotFoundError) as e:
        return [f"bench step config: {e}"]
    return []


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="print the plan and check it without a GPU")
    ap.add_argument("--out", default=None, help="result JSON (default benchmarks/results/gpu_check_<date>.json)")
    ap.add_argument("--work", default=None, help="scratch directory (default: a new one under /tmp)")
    ap.add_argument("--budget-s", type=int, default=BUDGET_S, help="overall time budget in seconds")
    ap.add_argument("--setup-s", type=float, default=None,
                    help="seconds the set-up already took (scripts/gpu_check.sh passes it; counts against the budget)")
    ap.add_argument("--only", nargs="*", default=None, help="run only these stages")
    args = ap.parse_args(argv)
    date = datetime.date.today().isoformat()
    out = args.out or os.path.join("benchmarks", "results", f"gpu_check_{date}.json")
    work = args.work or os.path.join("/tmp", f"dualrpo_gpu_check_{os.getpid()}")
    os.makedirs(work, exist_ok=True)
    have = available()
    stages = [s for s in plan(work, have) if args.only is None or s.name in args.only]
    setup = SETUP_S if args.setup_s is None else args.setup_s
    total = sum(s.limit_s for s in stages)
    print(f"gpu check: {len(stages)} stages, planned at most {total} s after {setup:.0f} s of set-up "
          f"(budget {args.budget_s} s)", flush=True)
    result: Dict = dict(date=date, commit=_commit(), dry_run=args.dry_run, versions=versions(), budget_s=args.budget_s,
                        planned_s=total, setup_s=setup, command=shlex.join(["scripts/gpu_check.sh"] + (argv or sys.argv[1:])),
                        stages={})
    deadline = time.time() + args.budget_s - setup
    for stage in stages:
        missing = [f"{n}: {have[n]}" for n in stage.needs if have.get(n) is not None]
        print(f"[{stage.name}] limit {stage.limit_s} s" + (f"; skipped: {'; '.join(missing)}" if missing else ""),
              flush=True)
        for cmd in stage.commands:
            print("    " + shlex.join(cmd), flush=True)
        if args.dry_run:
            rec = dry_check(stage)
            rec["would_skip"] = missing
        elif missing:
            rec = dict(commands=[shlex.join(c) for c in stage.commands], status="skipped", reason="; ".join(missing))
        else:
            rec = run_stage(stage, deadline)
        print(f"    -> {rec['status']}" + (f" ({rec['reason']})" if rec.get("reason") else "")
              + "".join(f"\n    ! {p}" for p in rec.get("problems", [])), flush=True)
        result["stages"][stage.name] = rec
    if total + setup > args.budget_s:
        result["plan_problem"] = f"set-up {setup:.0f} s + stages {total} s, over the {args.budget_s} s budget"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    from dualrpo_mcore.atomic import atomic_write_json

    atomic_write_json(out, result, indent=2, sort_keys=True)
    print(f"gpu check: wrote {out}", flush=True)
    bad = [n for n, r in result["stages"].items() if r["status"] in ("failed", "timeout", "broken")]
    if "plan_problem" in result:
        bad.append(result["plan_problem"])
    if bad:
        print(f"gpu check: NOT passed: {', '.join(bad)}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
