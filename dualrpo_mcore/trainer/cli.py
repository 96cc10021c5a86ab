"""``dualrpo train``: DualRPO / GRPO training from a recipe.

One process (TP=PP=1) or under ``torchrun --nproc-per-node N`` (gloo on CPU, NCCL on GPUs); the
world is split into TP x PP x DP. The resolved config is printed and saved as ``config.json`` in
the run directory (with ``reward_mode``, which ``dualrpo plot`` uses as the run's label).
"""
from __future__ import annotations

import argparse
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .recipes import RECIPES

    parser.add_argument("--recipe", default="tiny_cpu", choices=RECIPES.names(), help="config recipe")
    parser.add_argument("--data", required=True, help="data directory (`dualrpo data synth` output)")
    parser.add_argument("--init", default=None, help="initial policy: HF directory (e.g. `dualrpo sft` output)")
    parser.add_argument("--out", required=True, help="run directory (config.json, metrics.jsonl, checkpoints/)")
    parser.add_argument("--steps", type=int, default=None, help="RL steps (default: the recipe's)")
    parser.add_argument("--reward-mode", default=None, help="grpo | dualrpo | internal (default: the recipe's)")
    parser.add_argument("--resume", default=None, help="'auto' (newest checkpoint in the run dir) or a path")
    parser.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default: the recipe's)")
    parser.add_argument("--pp", type=int, default=None, help="pipeline-parallel size (default: the recipe's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field by its dotted path, e.g. schedule.mini_batches=2 or "
                             "reward.lam=0.5 (repeatable; config.json in the run dir shows every field)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args):
    """The recipe's config with the command line's overrides (checks run again on the changed tree)."""
    from .overrides import apply_overrides
    from .recipes import build_recipe

    kwargs = {k: getattr(args, k) for k in ("tp", "pp") if getattr(args, k) is not None}
    if args.steps is not None:
        kwargs["steps"] = args.steps
    if args.reward_mode is not None:
        kwargs["reward_mode"] = args.reward_mode
    cfg = build_recipe(args.recipe, args.data, args.init, args.out, **kwargs)
    cfg.checkpoint.resume = args.resume
    cfg.logging.progress = not args.no_progress
    return apply_overrides(cfg, getattr(args, "overrides", []))


def run(args) -> int:
    import torch.distributed as dist

    if args.init and not os.path.isdir(args.init):
        print(f"dualrpo train: --init {args.init} is not a directory", file=sys.stderr)
        return 2
    try:
        cfg = config_from_args(args)
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"dualrpo train: {e}", file=sys.stderr)
        return 2
    from .loop import train

    records = train(cfg)
    if dist.get_rank() == 0 and records:
        last = records[-1]
        print(f"train: {len(records)} steps (last {last['step']}); acc/all {last.get('acc/all', float('nan')):.3f}, "
              f"reward/all {last.get('reward/all', float('nan')):.4f}; run dir {cfg.logging.run_dir}")
    from dualrpo_mcore.parallel import teardown

    teardown()
    dist.destroy_process_group()
    return 0
