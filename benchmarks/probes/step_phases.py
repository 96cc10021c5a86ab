"""Where one actor update's time goes, packed against padded, on one process (TP=1):

    python benchmarks/probes/step_phases.py [--model tiny] [--rows 64] [--length-mix demo] [--rounds 3]

The same rows and actor as ``dualrpo bench train --compare-packing`` (its flags, its synthetic batch).
Each round runs ``--steps`` updates of one layout, then of the other (the order alternating by round), and
times the phases by wrapping the calls that make them: the split into micro-batches (packing included),
the ViT's forward (module hooks) and backward (from the gradient reaching its output to the end of that
micro-batch's backward: the ViT is the first thing the graph ran, so its backward is the tail), the rest
of the model's forward and backward (the LM), the head and loss (``Actor._fused_loss``), the optimizer,
and what is left. Medians over the rounds, in ms per update.

It answers one question about ``benchmarks/results/train_packing_cpu.md``: which part of the step no
layout shortens (the ViT, head, optimizer), and so how far the time saved can follow the padding removed.
"""
from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time

PHASES = ("split", "vit_fwd", "lm_fwd", "head_loss", "vit_bwd", "lm_bwd", "optim", "other")


def _timer(acc, name):
    def wrap(fn):
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                acc[name] += time.perf_counter() - t0
        return timed
    return wrap


def instrument(actor, acc):
    """Wrap the actor's calls so that ``acc`` sums each phase's seconds (totals: the caller splits them)."""
    import torch

    model = actor.module
    while hasattr(model, "module"):
        model = model.module
    actor._split = _timer(acc, "split")(actor._split)
    actor._fused_loss = _timer(acc, "head_loss")(actor._fused_loss)
    actor.optimizer.step = _timer(acc, "optim")(actor.optimizer.step)
    model.forward = _timer(acc, "model_fwd")(model.forward)
    torch.autograd.backward = _timer(acc, "backward")(torch.autograd.backward)
    started = {}

    def vit_out(_module, _inputs, out):
        acc["vit_fwd"] += time.perf_counter() - started.pop("fwd")
        if out.requires_grad:
            out.register_hook(lambda g: started.__setitem__("bwd", time.perf_counter()))
        return out

    model.vision.register_forward_pre_hook(lambda *_: started.__setitem__("fwd", time.perf_counter()))
    model.vision.register_forward_hook(vit_out)
    backward = torch.autograd.backward

    def backward_then_vit(*a, **k):
        out = backward(*a, **k)
        if "bwd" in started:
            acc["vit_bwd"] += time.perf_counter() - started.pop("bwd")
        return out

    torch.autograd.backward = backward_then_vit


def phases(acc, total: float) -> dict:
    """Per-phase seconds from the summed wraps: the model's forward minus the ViT's is the LM's (the head
    and loss run after it, in the schedule's loss function); likewise the backward minus the ViT's."""
    out = dict(split=acc["split"], vit_fwd=acc["vit_fwd"], head_loss=acc["head_loss"], vit_bwd=acc["vit_bwd"],
               optim=acc["optim"], lm_fwd=acc["model_fwd"] - acc["vit_fwd"],
               lm_bwd=acc["backward"] - acc["vit_bwd"])
    out["other"] = total - sum(out.values())
    return out


def _rank(rank: int, world: int, args) -> dict:
    """The rounds on this (the only) rank: per layout, per phase, the list of ms per update."""
    from dualrpo_mcore.bench.train import prepare

    _, _, batch, actor, _ = prepare(rank, world, args)
    acc = collections.defaultdict(float)
    instrument(actor, acc)
    layouts = ("packed", "padded")
    for layout in layouts:  # warm-up
        actor.packing = layout == "packed"
        actor.update(batch)
    rows = {k: collections.defaultdict(list) for k in layouts}
    for r in range(args.rounds):
        for layout in layouts if r % 2 == 0 else layouts[::-1]:
            actor.packing = layout == "packed"
            acc.clear()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                actor.update(batch)
            total = (time.perf_counter() - t0) / args.steps
            for name, sec in phases({k: v / args.steps for k, v in acc.items()}, total).items():
                rows[layout][name].append(sec * 1e3)
            rows[layout]["total"].append(total * 1e3)
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    return {k: dict(v) for k, v in rows.items()}


def main(argv=None) -> int:
    from dualrpo_mcore.bench import train as bench_train
    from dualrpo_mcore.parallel.spawn import run_distributed

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bench_train.add_arguments(p)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4, help="updates per layout per round")
    args = p.parse_args(["--model", "tiny", "--rows", "64", "--length-mix", "demo", "--micro-tokens", "4096"]
                        + list(sys.argv[1:] if argv is None else argv))
    if args.tp != 1 or args.pp != 1:
        raise SystemExit("step_phases.py times one process: --tp 1 --pp 1")
    bench_train.check_args(args)
    rows = run_distributed(_rank, 1, args, threads=os.cpu_count() or 1, timeout=3600)[0]
    print(f"\n{args.model}, {args.rows} rows, --length-mix {args.length_mix}, ms per update (median of "
          f"{args.rounds} rounds of {args.steps})")
    print("| phase | packed | padded | packed / padded | share of padded step |")
    print("|---|---|---|---|---|")
    med = {k: {n: statistics.median(v) for n, v in rows[k].items()} for k in rows}
    for name in PHASES + ("total",):
        pk, pd = med["packed"][name], med["padded"][name]
        ratio = f"{pk / pd:.2f}" if pd > 0.5 else "-"
        print(f"| {name} | {pk:.1f} | {pd:.1f} | {ratio} | {100 * pd / med['padded']['total']:.0f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
