"""The RL stage of ``dualrpo demo``, run on every rank under ``torchrun`` (``python -m
dualrpo_mcore.commands.demo_rl ...``).

It is :func:`.loop.train` on the ``tiny_cpu`` recipe plus the driver's ``--set`` overrides, with two
hooks: a wall-clock deadline (``should_stop``; rank 0's clock decides, every rank stops at the same
step boundary and the stop step is evaluated and checkpointed) and ``after_run``, which makes sure the
last step was evaluated, copies the first and last held-out evaluations to ``eval_before.json`` /
``eval_after.json`` for the driver (:mod:`.demo`), and exports the policy as a Hugging Face directory.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dualrpo_mcore.commands.demo_rl")
    p.add_argument("--data", required=True)
    p.add_argument("--init", required=True)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--hf-out", required=True, help="HF directory for the final policy (must not exist)")
    p.add_argument("--deadline", type=float, required=True, help="unix time by which the RL steps must stop")
    p.add_argument("--resume", action="store_true", help="continue from the run dir's newest checkpoint")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field by its dotted path, e.g. schedule.steps=200; repeatable")
    return p.parse_args(argv)


def build_config(args):
    """``tiny_cpu`` on the demo's data, the held-out split evaluated before the first update and after
    the last, then the driver's overrides (through the validated override path)."""
    from dualrpo_mcore.trainer.overrides import apply_overrides
    from dualrpo_mcore.trainer.recipes import build_recipe

    heldout = os.path.join(args.data, "heldout.parquet")
    if not os.path.exists(heldout):
        raise FileNotFoundError(f"{heldout} missing: the demo needs a held-out split")
    cfg = build_recipe("tiny_cpu", args.data, args.init, args.out)
    fixed = [f"eval.heldout={heldout}", "eval.before_train=true", f"logging.progress={not args.no_progress}",
             f"checkpoint.resume={'auto' if args.resume else 'none'}"]
    cfg = apply_overrides(cfg, fixed + list(args.set))
    steps = cfg.schedule.steps
    # Unless the driver asked for a curve, evaluate only before and after (the last step always is).
    derived = [] if cfg.eval.every else [f"eval.every={steps}"]
    if not any(item.startswith("checkpoint.every=") for item in args.set):
        derived.append(f"checkpoint.every={max(1, steps // 4)}")
    return apply_overrides(cfg, derived)


class DemoHooks:
    """The deadline and the demo's outputs (see the module docstring)."""

    def __init__(self, args):
        self.args = args

    def should_stop(self, step: int, seconds: float) -> bool:
        # A step like the last one must still fit before the deadline (with a margin for its eval).
        if time.time() + 1.2 * seconds <= self.args.deadline:
            return False
        print(f"demo rl: time budget reached after step {step} ({seconds:.1f}s/step); stopping", flush=True)
        return True

    def after_run(self, ctx, last: int) -> None:
        from dualrpo_mcore.trainer.context import _hf_config, broadcast
        from dualrpo_mcore.trainer.evaluation import eval_path, evaluate
        from dualrpo_mcore.commands.sft import save_hf

        run_dir, args = ctx.cfg.logging.run_dir, self.args
        if not broadcast(os.path.exists(eval_path(run_dir, last))):  # a resumed run that had no step left
            evaluate(ctx, last)
        if ctx.rank0:
            for step, name, label in ((0, "eval_before.json", "before RL (warm start)"),
                                      (last, "eval_after.json", f"after RL (step {last})")):
                _copy(eval_path(run_dir, step), os.path.join(args.out, name), label)
        # Rank 0's view decides, so no rank skips the export's collectives while another runs them.
        if broadcast(not os.path.exists(args.hf_out)):
            save_hf(ctx.actor, _hf_config(ctx.cfg), args.hf_out, os.path.join(args.data, "model"))
            if ctx.rank0:
                print(f"demo rl: exported the policy to {args.hf_out}", flush=True)


def _copy(src: str, dst: str, label: str) -> None:
    import json

    from dualrpo_mcore.atomic import atomic_path

    with open(src) as f:
        accuracy = json.load(f)["accuracy"].get("all", float("nan"))
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    print(f"demo rl: held-out eval {label}: accuracy/all {accuracy:.3f}", flush=True)


def main(argv=None) -> int:
    from dualrpo_mcore.parallel import shutdown
    from dualrpo_mcore.trainer.context import Hooks
    from dualrpo_mcore.trainer.loop import train

    args = parse_args(argv)
    demo = DemoHooks(args)
    train(build_config(args), Hooks(should_stop=demo.should_stop, after_run=demo.after_run))
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
