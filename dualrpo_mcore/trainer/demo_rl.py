"""The RL stage of ``dualrpo demo``, run on every rank under ``torchrun`` (``python -m
dualrpo_mcore.trainer.demo_rl ...``).

It is :func:`.loop.train` with what the demo needs around it: a held-out evaluation of the
warm-started policy before the first update (the loop only evaluates after steps), a wall-clock
deadline (rank 0 decides, every rank stops at the same step boundary and the stop step is
checkpointed), the evaluation after the last step, and the policy exported as a Hugging Face
directory. Results go to JSON files the driver (:mod:`.demo`) reads.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dualrpo_mcore.trainer.demo_rl")
    p.add_argument("--data", required=True)
    p.add_argument("--init", required=True)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--hf-out", required=True, help="HF directory for the final policy (must not exist)")
    p.add_argument("--reward-mode", default="dualrpo")
    p.add_argument("--steps", type=int, required=True, help="upper bound on RL steps")
    p.add_argument("--deadline", type=float, required=True, help="unix time by which the RL steps must stop")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--temperature", type=float, default=1.0, help="rollout sampling temperature")
    p.add_argument("--dynamic-sampling", action="store_true",
                   help="drop groups whose verifier rewards are all equal and refill (schedule.dynamic_sampling)")
    p.add_argument("--max-refill-rounds", type=int, default=2)
    p.add_argument("--engine-on-every-rank", action="store_true",
                   help="a rollout engine replica per process, each generating a share (rollout.engine_on_every_rank)")
    p.add_argument("--mini-batches", type=int, default=1, help="optimizer updates per pass over a step's batch")
    p.add_argument("--epochs", type=int, default=1, help="passes over the mini-batches per step")
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps (0: before/after only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the run dir's newest checkpoint")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field by its dotted path (after the flags above), e.g. "
                        "--set actor.loss.agg=seq-mean; repeatable")
    return p.parse_args(argv)


def build_config(args):
    from .overrides import apply_overrides
    from .recipes import build_recipe

    cfg = build_recipe("tiny_cpu", args.data, args.init, args.out, steps=args.steps, reward_mode=args.reward_mode,
                       tp=args.tp, group_size=args.group_size, prompts_per_step=args.prompts_per_step,
                       max_new_tokens=args.max_new_tokens, lr=args.lr, seed=args.seed)
    # The recipe samples at 1.0; the actor's log-probs must use the same temperature as the engine.
    cfg.actor.temperature = cfg.rollout.sampling.temperature = args.temperature
    heldout = os.path.join(args.data, "heldout.parquet")
    if not os.path.exists(heldout):
        raise FileNotFoundError(f"{heldout} missing: the demo needs a held-out split")
    # eval.every > 0 makes rank 0 load the held-out prompts; this module decides when to evaluate.
    cfg.eval.every, cfg.eval.heldout, cfg.eval.max_samples = max(1, args.steps), heldout, args.eval_samples
    cfg.schedule.dynamic_sampling, cfg.schedule.max_refill_rounds = args.dynamic_sampling, args.max_refill_rounds
    # Through the override path, so the checks and the warm-up length derived from them run again.
    apply_overrides(cfg, [f"schedule.mini_batches={args.mini_batches}", f"schedule.epochs={args.epochs}",
                          f"rollout.engine_on_every_rank={args.engine_on_every_rank}", *args.set])
    cfg.checkpoint.every = max(1, args.steps // 4)
    cfg.checkpoint.resume = "auto" if args.resume else None
    cfg.logging.progress = not args.no_progress
    return cfg


def _write_json(path: str, obj: Dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def _eval(ctx, step: int, path: str, label: str) -> Dict[str, float]:
    """Held-out accuracy (computed on rank 0; with an engine per rank, every rank generates a share)."""
    from . import steps
    from .metrics import HELDOUT, HELDOUT_LEVELS

    t0 = time.time()
    acc = steps.evaluate(ctx, step)
    if ctx.rank0:
        tasks, levels = HELDOUT + "acc/", HELDOUT_LEVELS + "acc/"
        _write_json(path, dict(step=step, seconds=time.time() - t0,
                               acc={k[len(tasks):]: v for k, v in acc.items() if k.startswith(tasks)},
                               by_difficulty={k[len(levels):]: v for k, v in acc.items() if k.startswith(levels)}))
        print(f"demo rl: held-out eval {label} (step {step}): acc/all {acc.get('eval/acc/all', float('nan')):.3f} "
              f"in {time.time() - t0:.1f}s", flush=True)
    return acc


def run_steps(ctx, args, start: int) -> int:
    """RL steps until ``--steps`` or the deadline; returns the last step run (``start`` if none)."""
    from . import loop, recovery, steps

    cfg, step, last_dt = ctx.cfg, start, 0.0
    for step in range(start + 1, cfg.schedule.steps + 1):
        t0 = time.time()
        metrics = loop.train_step(ctx, step, steps.Hooks())
        last_dt = time.time() - t0
        # Rank 0's clock decides for everyone, so all ranks leave at the same step boundary.
        stop = steps.broadcast(time.time() + 1.2 * last_dt > args.deadline)
        last = stop or step == cfg.schedule.steps
        if args.eval_every and step % args.eval_every == 0 and not last:
            metrics.update(steps.evaluate(ctx, step))
        if last:
            metrics.update(_eval(ctx, step, os.path.join(args.out, "eval_after.json"), "after RL"))
        recovery.commit(ctx, step, metrics, checkpoint=last or step % cfg.checkpoint.every == 0)
        if stop:
            if ctx.rank0:
                print(f"demo rl: time budget reached after step {step} ({last_dt:.1f}s/step); stopping", flush=True)
            break
    return step


def main(argv=None) -> int:
    import torch.distributed as dist

    from . import faults, probe, recovery, steps
    from .sft_cli import save_hf

    args = parse_args(argv)
    cfg = build_config(args)
    faults.arm()
    recovery.preflight(cfg)
    resolved = steps.write_config(cfg, cfg.logging.run_dir)
    ctx = steps.setup(cfg)
    try:
        start = steps.resume(ctx)
        recovery.open_logger(ctx, resolved, start)
        steps.sync(ctx)
        probe.check(ctx, start)
        before = os.path.join(args.out, "eval_before.json")
        if start == 0 or not os.path.exists(before):
            acc = _eval(ctx, 0, before, "before RL (warm start)")
            if start == 0:  # step 0 of the curves; a resumed run's file has it already
                recovery.record(ctx, 0, acc)
        last = run_steps(ctx, args, start)
        if last == start and ctx.rank0 and not os.path.exists(os.path.join(args.out, "eval_after.json")):
            _eval(ctx, last, os.path.join(args.out, "eval_after.json"), "after RL")
    finally:
        steps.close(ctx)
    # Rank 0's view decides, so no rank skips the export's collectives while another runs them.
    if steps.broadcast(not os.path.exists(args.hf_out)):
        save_hf(ctx.actor, steps._hf_config(cfg), args.hf_out, os.path.join(args.data, "model"))
        if ctx.rank0:
            print(f"demo rl: exported the policy to {args.hf_out}", flush=True)
    from dualrpo_mcore.parallel import teardown

    teardown()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
