"""Print the markdown table of ``benchmarks/results/train_packing_cpu.md`` from the
``train_packing_cpu_<run>.json`` files that ``dualrpo bench train --compare-packing --json`` wrote.

    python benchmarks/probes/packing_table.py [RESULTS_DIR] [RUN ...]

Each row: the run, its exact command, the padding shares (of the padded layout's LM FLOPs and of its
step's FLOPs), both layouts' tokens/s, the speed-up and time saved, and whether the time saved reaches
each padding share; the commit and date each JSON was measured at are printed under the table.
"""
from __future__ import annotations

import glob
import json
import os
import sys

DEFAULT_RUNS = ("tiny_tp1_demo", "tiny_tp1_heavy", "tiny_tp2_demo", "tiny_tp2_heavy", "small_tp1_demo",
                "small_tp1_heavy")


def row(path: str) -> str:
    with open(path) as f:
        doc = json.load(f)
    p = doc["results"]["summary"]["packing"]
    if "step_padding_fraction" not in p:
        raise ValueError(f"{path}: written before the step's padding share was reported; re-run its command")
    pk, pd = p["rows"]
    name = os.path.basename(path)[len("train_packing_cpu_"):-len(".json")]
    reach = lambda ok: "yes" if ok else "no"  # noqa: E731
    return (f"| {name} | `{doc['command']}` | {100 * p['padding_fraction']:.1f} | "
            f"{100 * p['step_padding_fraction']:.1f} | {pk['tokens_per_s_per_device']:.0f} | "
            f"{pd['tokens_per_s_per_device']:.0f} | {p['speedup']:.2f}x | {100 * p['time_saved']:.1f} | "
            f"{reach(p['gain_matches_step_padding'])} / {reach(p['gain_matches_padding'])} | "
            f"{pk['peak_extra_mib']:.0f} / {pd['peak_extra_mib']:.0f} |"), f"{name}: {doc['commit'][:7]} {doc['date'][:16]}"


def main(argv) -> int:
    results = argv[0] if argv else os.path.join(os.path.dirname(__file__), "..", "results")
    runs = argv[1:] or DEFAULT_RUNS
    paths = [os.path.join(results, f"train_packing_cpu_{r}.json") for r in runs]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        have = sorted(glob.glob(os.path.join(results, "train_packing_cpu_*.json")))
        print(f"missing: {missing}; present: {have}", file=sys.stderr)
        return 2
    print("| run | command | padding % of LM FLOPs | padding % of step FLOPs | packed tok/s/dev | "
          "padded tok/s/dev | speed-up | time saved % | time saved >= step / LM padding | "
          "peak MiB packed / padded |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    stamps = []
    for path in paths:
        line, stamp = row(path)
        print(line)
        stamps.append(stamp)
    print("\nMeasured at: " + "; ".join(stamps))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
