"""``dualrpo bench NAME``: dispatch to the benchmark modules present in this build."""
from __future__ import annotations

import argparse

from dualrpo_mcore.cli import add_command_table

BENCHES = {
    "verifiers": ("dualrpo_mcore.bench.verifiers", "verifier pool throughput and adversarial latency"),
    "token-stats": ("dualrpo_mcore.bench.token_stats", "fused token statistics vs naive and Megatron"),
    "data": ("dualrpo_mcore.bench.data", "rows/s through loader + image processor"),
    "weight-sync": ("dualrpo_mcore.bench.weight_sync", "GB/s of weight gather + bucketing"),
    "train": ("dualrpo_mcore.bench.train", "train-step throughput and MFU"),
    "rollout": ("dualrpo_mcore.bench.rollout", "rollout tokens/s: HF engine (and SGLang) vs model.generate"),
    "step": ("dualrpo_mcore.bench.step", "end-to-end RL step time by phase"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_command_table(parser.add_subparsers(dest="bench", metavar="NAME"), BENCHES, "_bench_run")
    parser.set_defaults(_bench_parser=parser)


def run(args: argparse.Namespace) -> int:
    if not getattr(args, "_bench_run", None):
        args._bench_parser.print_help()
        return 2
    return int(args._bench_run(args) or 0)
