"""Histogram of the response lengths of ``dualrpo demo``'s RL rollouts, for ``dualrpo bench train
--length-mix demo``.

    python benchmarks/probes/response_lengths.py [--demo outputs/demo] [--steps 30] \\
        [--out benchmarks/results/response_lengths_demo.json]

A previous ``make demo`` run (``--demo``: its ``data/`` with the SFT warm start ``data/sft``, and the RL
result ``hf_dualrpo``) is required. For each policy, the demo's RL stage is run as the demo runs it
(``tiny_cpu`` recipe plus the demo driver's own ``--set`` items at its defaults: TP=2 on 2 processes,
16 prompts x G=4 per step, max_new_tokens=64, temperature 1, dynamic sampling; held-out evaluation and
checkpoints off) for ``--steps`` steps, and the response length of every row of every update batch (the
rows the actor trains on, ``batch["length"]``) is recorded. The two policies bracket the demo's run: the
warm start its first steps sample from, and the final policy its last steps sample from; the histogram
pools both. The demo run's own per-step mean lengths (``run_dualrpo/metrics.jsonl``, ``length/all``)
are copied into the output for comparison.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", default="outputs/demo", help="a finished `dualrpo demo --out` directory")
    p.add_argument("--steps", type=int, default=30, help="RL steps per policy")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "response_lengths_demo.json"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # init dir (under torchrun)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def demo_overrides(steps: int):
    """The demo driver's RL ``--set`` items at its defaults, then this probe's: ``steps`` steps, no
    held-out evaluation, no checkpoints."""
    from dualrpo_mcore.commands import demo

    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    items = demo.rl_overrides(parser.parse_args([]))
    return items + [f"schedule.steps={steps}", "eval.every=0", "checkpoint.every=0", "logging.progress=false"]


def worker(args) -> None:
    """One policy, on every rank under torchrun; rank 0 writes the recorded lengths."""
    import torch.distributed as dist

    from dualrpo_mcore.parallel import teardown
    from dualrpo_mcore.trainer.context import Hooks
    from dualrpo_mcore.trainer.loop import train
    from dualrpo_mcore.trainer.recipes import build_recipe

    data = os.path.join(args.demo, "data")
    run_dir = tempfile.mkdtemp(prefix="dualrpo-lengths-")
    cfg = build_recipe("tiny_cpu", data, args.worker, run_dir, overrides=demo_overrides(args.steps))
    rows = []

    def record(step, batch):
        rows.extend(dict(step=step, length=int(n), overlong=bool(o))
                    for n, o in zip(batch["length"].tolist(), batch["overlong"].tolist()))

    train(cfg, Hooks(before_update=record))
    if dist.get_rank() == 0:
        with open(args.worker_out, "w") as f:
            json.dump(dict(init=args.worker, rows=rows, max_new_tokens=cfg.rollout.sampling.max_new_tokens), f)
    teardown()
    dist.destroy_process_group()


def _logged_means(demo: str):
    path = os.path.join(demo, "run_dualrpo", "metrics.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        means = [r["length/all"] for r in map(json.loads, f) if "length/all" in r]
    if not means:
        return None
    head, tail = means[:10], means[-10:]
    return dict(steps=len(means), mean=sum(means) / len(means), first10_mean=sum(head) / len(head),
                last10_mean=sum(tail) / len(tail))


def _commit():
    out = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or None


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    demo = os.path.abspath(args.demo)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    parts, tmp = [], tempfile.mkdtemp(prefix="dualrpo-lengths-")
    for name, init in (("sft warm start", os.path.join(demo, "data", "sft")),
                       ("rl result", os.path.join(demo, "hf_dualrpo"))):
        if not os.path.isdir(init):
            print(f"response_lengths: {init} missing: run `make demo` first", file=sys.stderr)
            return 2
        out = os.path.join(tmp, f"{len(parts)}.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               os.path.abspath(__file__), "--demo", demo, "--steps", str(args.steps), "--worker", init,
               "--worker-out", out]
        print(f"response_lengths: {name}: {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True, env=env, cwd=ROOT)
        with open(out) as f:
            parts.append(dict(json.load(f), policy=name))
    write(args, demo, parts)
    return 0


def write(args, demo: str, parts) -> None:
    lengths = [r["length"] for p in parts for r in p["rows"]]
    hist = Counter(lengths)
    per_policy = {}
    for p in parts:
        ls = [r["length"] for r in p["rows"]]
        per_policy[p["policy"]] = dict(init=os.path.relpath(p["init"], ROOT), samples=len(ls), mean=sum(ls) / len(ls),
                                       overlong=sum(r["overlong"] for r in p["rows"]),
                                       histogram={str(k): v for k, v in sorted(Counter(ls).items())})
    doc = dict(what="response lengths (tokens) of the rows of the demo's RL update batches",
               command=" ".join([os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(ROOT) else
                                 sys.executable, os.path.relpath(os.path.abspath(__file__), ROOT), *sys.argv[1:]]),
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(), commit=_commit(),
               demo=os.path.relpath(demo, ROOT), steps_per_policy=args.steps, settings=demo_overrides(args.steps),
               max_new_tokens=parts[0]["max_new_tokens"], samples=len(lengths), mean=sum(lengths) / len(lengths),
               median=sorted(lengths)[len(lengths) // 2], max=max(lengths),
               histogram={str(k): v for k, v in sorted(hist.items())}, per_policy=per_policy,
               demo_run_logged_lengths=_logged_means(demo))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=2)
    print(f"wrote {args.out}: {len(lengths)} samples, mean {doc['mean']:.1f}, median {doc['median']}, "
          f"max {doc['max']}; demo run logged mean {(doc['demo_run_logged_lengths'] or {}).get('mean')}")


if __name__ == "__main__":
    sys.exit(main())
