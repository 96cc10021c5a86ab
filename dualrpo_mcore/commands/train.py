"""``dualrpo train``: DualRPO / GRPO training from a recipe.

One process (TP=PP=1) or under ``torchrun --nproc-per-node N`` (gloo on CPU, NCCL on GPUs); the
world is split into TP x PP x DP. The resolved config is printed and saved as ``config.json`` in
the run directory (with ``reward_mode``, which ``dualrpo plot`` uses as the run's label).

A layout that needs more processes than were started (``--tp 2`` as one process) stops at once with
one line giving the ``torchrun`` and ``dualrpo launch`` commands that start them. It does not start
them itself: how many processes (the data-parallel size), on which devices and nodes, and who
forwards a preemption signal to them are the launcher's decisions; a trainer that re-spawned itself
would hide a second process tree from the scheduler. (``dualrpo demo`` owns its processes because it
is a fixed script.) Exit statuses (1 on a storage fault, 75 after SIGTERM or SIGUSR1, see
``preempt``): docs/design.md §3.6.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys


# flag -> the SETTINGS name it spells (``--steps 4`` is ``--set schedule.steps=4``).
ALIAS_FLAGS = {"--steps": "steps", "--reward-mode": "reward_mode", "--tp": "tp", "--pp": "pp", "--resume": "resume"}
_LAYOUT = ("actor.parallel.tp", "actor.parallel.pp")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dualrpo_mcore.trainer.overrides import add_alias, add_set_argument
    from dualrpo_mcore.trainer.recipes import RECIPES, SETTINGS

    parser.add_argument("--recipe", default="tiny_cpu", choices=RECIPES.names(), help="config recipe")
    parser.add_argument("--data", required=True, help="data directory (`dualrpo data synth` output)")
    parser.add_argument("--init", default=None, help="initial policy: HF directory (e.g. `dualrpo sft` output)")
    parser.add_argument("--out", required=True, help="run directory (config.json, metrics.jsonl, checkpoints/)")
    add_set_argument(parser, "schedule.mini_batches=2 or reward.lam=0.5 (config.json in the run dir shows "
                             "every field)")
    helps = {"steps": "RL steps", "reward_mode": "grpo | dualrpo | internal", "tp": "tensor-parallel size",
             "pp": "pipeline-parallel size", "resume": "'auto' (newest checkpoint in the run dir) or a path"}
    for flag, name in ALIAS_FLAGS.items():
        add_alias(parser, flag, SETTINGS[name], helps[name], metavar=name.upper())
    add_alias(parser, "--no-progress", SETTINGS["progress"], "no progress bar", value="false")
    add_alias(parser, "--no-packing", SETTINGS["packing"], "padded [B, S] micro-batches instead of packed "
              "streams", value="false")


def config_from_args(args):
    """The recipe's config with the command line's ``--set`` entries and alias flags, in their order."""
    from dualrpo_mcore.trainer.recipes import build_recipe

    return build_recipe(args.recipe, args.data, args.init, args.out, getattr(args, "overrides", []))


def _train_argv(args) -> tuple:
    """``(where, sets)``: the flags that place a run (recipe, data, out, init) and its overrides but the
    layout's (printed apart), for the commands a wrong world size prints."""
    where = ["--recipe", args.recipe, "--data", args.data, "--out", args.out]
    where += ["--init", args.init] if args.init else []
    return where, [kv for kv in getattr(args, "overrides", []) if kv.partition("=")[0] not in _LAYOUT]


def _as_set(items) -> list:
    return [x for kv in items for x in ("--set", kv)]


def world_problem(args, cfg) -> str:
    """One line when this world cannot hold tp x pp (else ''): the commands that start enough processes."""
    tp, pp = cfg.actor.parallel.tp, cfg.actor.parallel.pp
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % (tp * pp) == 0:
        return ""
    n, (where, sets) = tp * pp, _train_argv(args)
    layout = ["--tp", str(tp), "--pp", str(pp)]
    train = ["train", *where, *layout, *_as_set(sets)]
    launch = ["launch", *where, *layout, "--executor", "local", "--nproc-per-node", str(n)]
    rest = _as_set(kv for kv in sets if kv != "logging.progress=false")  # the launcher adds --no-progress itself
    launch += ["--", *rest] if rest else []
    return (f"dualrpo train: tp={tp} x pp={pp} needs a multiple of {n} processes, this is {world}; start them with "
            f"`torchrun --standalone --nproc-per-node {n} -m dualrpo_mcore {shlex.join(train)}` or "
            f"`dualrpo {shlex.join(launch)}`")


def run(args) -> int:
    import torch.distributed as dist

    from dualrpo_mcore.parallel import shutdown
    from dualrpo_mcore.trainer.storage import CheckpointLoadError, StorageError

    if args.init and not os.path.isdir(args.init):
        print(f"dualrpo train: --init {args.init} is not a directory", file=sys.stderr)
        return 2
    try:
        cfg = config_from_args(args)
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"dualrpo train: {e}", file=sys.stderr)
        return 2
    problem = world_problem(args, cfg)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    from dualrpo_mcore.trainer.loop import train
    from dualrpo_mcore.trainer.preempt import REQUEUE_EXIT, Preempted

    try:
        records = train(cfg)
    except (Preempted, StorageError, CheckpointLoadError) as e:
        # The same line on every rank, and no traceback: the message is the whole story. Preempted is
        # not a failure: a requeued job (or the operator) resumes from the step just checkpointed.
        print(f"dualrpo train: {e}", file=sys.stderr, flush=True)
        shutdown()
        return REQUEUE_EXIT if isinstance(e, Preempted) else 1
    if dist.get_rank() == 0 and records:
        last = records[-1]
        print(f"train: {len(records)} steps (last {last['step']}); "
              f"accuracy/all {last.get('accuracy/all', float('nan')):.3f}, "
              f"reward/all {last.get('reward/all', float('nan')):.4f}; run dir {cfg.logging.run_dir}")
    shutdown()
    return 0
