"""``dualrpo data synth`` and ``dualrpo data convert-vtriune``."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dualrpo_mcore.data.synth import LAYOUTS

    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    s = sub.add_parser("synth", help="generate the synthetic eight-task set (+ tokenizer/processor)")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--num-per-task", type=int, default=200, help="train samples per task")
    s.add_argument("--heldout-per-task", type=int, default=None,
                   help="held-out samples per task (default: num-per-task // 10, at least 1)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--layout", default="free", choices=tuple(LAYOUTS),
                   help="free: objects anywhere (for real models); grid: every object on the tiny demo "
                        "policy's 28-pixel token grid (what `dualrpo demo` uses)")
    s.add_argument("--vocab-size", type=int, default=2048, help="tokenizer size incl. special tokens")
    s.add_argument("--min-pixels", type=int, default=56 * 56)
    s.add_argument("--max-pixels", type=int, default=168 * 112,
                   help="processor bound; the default keeps every synthetic image at its own size")
    s.add_argument("--no-tokenizer", action="store_true", help="skip the tokenizer/processor files")
    c = sub.add_parser("convert-vtriune", help="convert V-Triune rows (reward_model.verifier, ...) to ours")
    c.add_argument("src", help="V-Triune parquet / jsonl file")
    c.add_argument("out", help="output parquet file")
    c.add_argument("--min-pixels", type=int, default=56 * 56)
    c.add_argument("--max-pixels", type=int, default=28 * 28 * 1280)
    c.add_argument("--fail-fast", action="store_true", help="stop at the first bad row")
    parser.set_defaults(_data_parser=parser)


def _progress(total: int, label: str):
    start, last = time.time(), [0]

    def report(done: int) -> None:
        if done == total or done - last[0] >= max(1, total // 10):
            last[0] = done
            print(f"  {label}: {done}/{total} rows ({time.time() - start:.1f}s)", file=sys.stderr, flush=True)

    return report


def run_synth(args) -> int:
    from dualrpo_mcore.data import synth
    from dualrpo_mcore.data.schema import TASKS

    if args.num_per_task < 1:
        print("--num-per-task must be >= 1", file=sys.stderr)
        return 2
    held = args.heldout_per_task if args.heldout_per_task is not None else max(1, args.num_per_task // 10)
    os.makedirs(args.out, exist_ok=True)
    counts = {}
    for split, n in (("train", args.num_per_task), ("heldout", held)):
        path = os.path.join(args.out, f"{split}.parquet")
        counts[split] = synth.write_split(path, n, seed=args.seed, split=split, layout=args.layout,
                                          progress=_progress(n * len(TASKS), split))
        print(f"wrote {path}: {counts[split]} rows ({n} per task x {len(TASKS)} tasks)")
    manifest = {"seed": args.seed, "layout": args.layout, "tasks": list(TASKS), "rows": counts,
                "num_per_task": {"train": args.num_per_task, "heldout": held}}
    if not args.no_tokenizer:
        from dualrpo_mcore.data.tokenizer import build_model_files

        model_dir = os.path.join(args.out, "model")
        facts = build_model_files(synth.corpus_texts(), model_dir,
                                  vocab_size=args.vocab_size, min_pixels=args.min_pixels,
                                  max_pixels=args.max_pixels)
        manifest["tokenizer"] = {k: v for k, v in facts.items() if k != "ids"}
        print(f"wrote {model_dir}: tokenizer (vocab {facts['vocab_size']}, image_token_id "
              f"{facts['image_token_id']}, eos {facts['eos_token_id']}), preprocessor_config.json, "
              f"chat_template.jinja")
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
    return 0


def run_convert(args) -> int:
    from dualrpo_mcore.data.vtriune import convert_file

    n, errors = convert_file(args.src, args.out, min_pixels=args.min_pixels,
                             max_pixels=args.max_pixels, fail_fast=args.fail_fast)
    print(f"wrote {args.out}: {n} rows; skipped {len(errors)}")
    for e in errors[:20]:
        print(f"  {e}")
    return 0 if n else 1


def run(args) -> int:
    if args.data_command == "synth":
        return run_synth(args)
    if args.data_command == "convert-vtriune":
        return run_convert(args)
    args._data_parser.print_help()
    return 2
