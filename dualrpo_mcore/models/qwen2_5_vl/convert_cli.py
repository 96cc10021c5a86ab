"""``dualrpo convert``: HF <-> Megatron checkpoints for Qwen2.5-VL.

    dualrpo convert hf-to-mcore --hf DIR --out DIR --tp 2 --pp 2
    dualrpo convert mcore-to-hf --mcore DIR --out DIR
"""
from __future__ import annotations

import argparse
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    a = sub.add_parser("hf-to-mcore", help="HF directory -> Megatron checkpoint for a TP/PP layout")
    a.add_argument("--hf", required=True, help="HF checkpoint directory (safetensors + config + tokenizer)")
    a.add_argument("--out", required=True, help="new Megatron checkpoint directory (must not exist)")
    a.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    a.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    a.add_argument("--te-spec", action="store_true",
                   help="name norms as the Transformer Engine spec does (fused into the next linear)")
    a.add_argument("--vocab-divisible-by", type=int, default=128, help="pad the vocab to a multiple of this")
    b = sub.add_parser("mcore-to-hf", help="Megatron checkpoint -> HF directory (transformers/SGLang load it)")
    b.add_argument("--mcore", required=True, help="Megatron checkpoint directory written by hf-to-mcore")
    b.add_argument("--out", required=True, help="new HF directory (must not exist)")
    b.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors shard")


def run(args: argparse.Namespace) -> int:
    from . import convert

    t0 = time.time()
    try:
        if args.direction == "hf-to-mcore":
            if args.tp < 1 or args.pp < 1:
                raise ValueError("--tp and --pp must be >= 1")
            convert.hf_to_megatron(args.hf, args.out, tp=args.tp, pp=args.pp, te_spec=args.te_spec,
                                   vocab_divisible_by=args.vocab_divisible_by)
        else:
            convert.megatron_to_hf(args.mcore, args.out, max_shard_bytes=int(args.max_shard_gb * 1024 ** 3))
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
        print(f"dualrpo convert: error: {e}", file=sys.stderr)
        return 1
    print(f"dualrpo convert: wrote {args.out} in {time.time() - t0:.1f}s")
    return 0
