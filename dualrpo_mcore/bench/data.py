"""``dualrpo bench data``: rows/s through the loader + Qwen2.5-VL image processor.

Baselines measured in the same run on the same synthetic rows:
  raw datasets      iterate the parquet rows with ``datasets`` only (no decode, no processing)
  per-sample        decode + process the image once for every one of the G samples of a prompt
                    (what a rollout that does not share processing across its group pays)
  loader            ``PromptLoader``: validate, decode, process once per prompt, tokenize
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=None, help="parquet file (default: generate a synthetic one)")
    parser.add_argument("--num-per-task", type=int, default=25, help="synthetic rows per task")
    parser.add_argument("--prompts", type=int, default=200, help="prompts to draw per measurement")
    parser.add_argument("--group-size", type=int, default=8, help="samples per prompt (G)")
    parser.add_argument("--max-pixels", type=int, default=168 * 112)
    parser.add_argument("--json", default=None, help="write results here as JSON")


def _timed(fn, n, what):
    print(f"measuring {what} ...", file=sys.stderr, flush=True)
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)


def run(args) -> int:
    import datasets

    from dualrpo_mcore.data import synth
    from dualrpo_mcore.data.config import DataConfig, SourceConfig
    from dualrpo_mcore.data.images import ImageProcessor, open_image
    from dualrpo_mcore.data.loader import PromptLoader

    tmp = tempfile.mkdtemp(prefix="dualrpo-bench-data-")
    path = args.data
    if path is None:
        path = os.path.join(tmp, "train.parquet")
        print(f"generating {args.num_per_task} rows per task -> {path}", file=sys.stderr, flush=True)
        synth.write_split(path, args.num_per_task, seed=0, split="train")
    cfg = DataConfig(sources=[SourceConfig(path=path)], max_pixels=args.max_pixels, seed=0)
    n, g = args.prompts, args.group_size
    ds = datasets.Dataset.from_parquet(path)

    def raw():
        for i in range(n):
            ds[i % len(ds)]

    loader = PromptLoader(cfg)
    loader.next_prompts(4)  # warm-up: imports, first processor build

    proc = ImageProcessor(cfg.min_pixels, cfg.max_pixels)
    proc([open_image(e) for e in ds[0]["images"]])  # warm-up outside the timed region

    def per_sample():
        for i in range(n):
            row = ds[i % len(ds)]
            for _ in range(g):
                proc([open_image(e) for e in row["images"]])

    results = {}
    results["raw datasets"] = _timed(raw, n, "raw datasets")
    results[f"per-sample (x{g})"] = _timed(per_sample, n, "per-sample processing")
    results["loader (once/prompt)"] = _timed(lambda: loader.next_prompts(n), n, "loader")
    base = results[f"per-sample (x{g})"]
    print(f"\nrows = prompts; each prompt feeds G={g} samples; {n} prompts per measurement")
    print(f"{'path':<24}{'prompts/s':>12}{'samples/s':>12}{'vs per-sample':>15}")
    for name, rate in results.items():
        print(f"{name:<24}{rate:>12.1f}{rate * g:>12.1f}{rate / base:>14.2f}x")
    if args.json:
        from dualrpo_mcore.atomic import atomic_write_json

        atomic_write_json(args.json, {"prompts_per_s": results, "group_size": g, "prompts": n}, indent=2)
    return 0
