"""The ``dualrpo`` command line (also ``python -m dualrpo_mcore``).

This file only maps names to modules (the modules' interface: docs/design.md §2.3), so subsystems
add commands without touching each other. A name whose module is not part of this build yet is left
out of ``--help`` rather than offered as a stub.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# name -> (module, one-line help)
COMMANDS = {
    "train": ("dualrpo_mcore.commands.train", "run DualRPO / GRPO training"),
    "sft": ("dualrpo_mcore.commands.sft", "supervised warm-start on the Megatron actor"),
    "demo": ("dualrpo_mcore.commands.demo", "the tiny CPU demo end to end"),
    "convert": ("dualrpo_mcore.models.qwen2_5_vl.convert_cli", "HF <-> Megatron checkpoint conversion"),
    "data": ("dualrpo_mcore.data.cli", "dataset tools (synthetic eight-task set, V-Triune conversion)"),
    "bench": ("dualrpo_mcore.bench.cli", "benchmarks that print ratios against baselines"),
    "plot": ("dualrpo_mcore.commands.plot", "training curves from one or more runs"),
    "plan": ("dualrpo_mcore.planner.plan", "per-GPU memory plan for a recipe"),
    "launch": ("dualrpo_mcore.launch.cli", "launch a recipe through nemo-run"),
    "env": ("dualrpo_mcore.env", "versions, GPUs and kernel paths, for bug reports; non-zero if unsupported"),
}
# Commands that start work whose speed depends on the compiled kernels: each says at start which
# path every op takes, so a kernel that failed to build or load is seen at once, not in a profile.
KERNEL_REPORT = ("train", "bench", "demo")


def available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def add_command_table(sub, table: dict, run_attr: str) -> None:
    """Add one subparser per ``name -> (module, help)`` entry whose module is present; the
    module's ``run`` is stored on the parsed namespace under ``run_attr``."""
    for name, (module, help_text) in table.items():
        if not available(module):
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(**{run_attr: mod.run})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dualrpo",
                                     description="DualRPO trainer for vision-language models on Megatron-Core")
    add_command_table(parser.add_subparsers(dest="command", metavar="COMMAND"), COMMANDS, "_run")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    if args.command in KERNEL_REPORT:
        from dualrpo_mcore.ops.report import log_kernel_paths

        log_kernel_paths(args.command)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
