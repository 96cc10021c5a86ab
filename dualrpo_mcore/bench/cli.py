"""``dualrpo bench NAME``: dispatch to the benchmark modules present in this build."""
from __future__ import annotations

import argparse
import importlib

from dualrpo_mcore.cli import available

BENCHES = {
    "verifiers": ("dualrpo_mcore.bench.verifiers", "verifier pool throughput and adversarial latency"),
    "token-stats": ("dualrpo_mcore.bench.token_stats", "fused token statistics vs naive and Megatron"),
    "data": ("dualrpo_mcore.bench.data", "rows/s through loader + image processor"),
    "weight-sync": ("dualrpo_mcore.bench.weight_sync", "GB/s of weight gather + bucketing"),
    "train": ("dualrpo_mcore.bench.train", "train-step throughput and MFU"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="NAME")
    for name, (module, help_text) in BENCHES.items():
        if not available(module):
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(_bench_run=mod.run)
    parser.set_defaults(_bench_parser=parser)


def run(args: argparse.Namespace) -> int:
    if not getattr(args, "_bench_run", None):
        args._bench_parser.print_help()
        return 2
    return int(args._bench_run(args) or 0)
