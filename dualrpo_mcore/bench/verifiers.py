"""``dualrpo bench verifiers``: throughput of the sandboxed pool, and its worst case.

Three batches go through the same run:

* **mixed**: realistic correct and incorrect responses for all eight tasks (math, choice,
  numeric, counting, ocr, grounding, detection, format). Baselines measured in the same run:
  in-process serial ``score_with_info`` (what a trainer without a sandbox would do) and the pool
  with one worker; the table gives each runner's ratio against the serial baseline.
* **adversarial**: the corpus of :mod:`dualrpo_mcore.verifiers.sandbox.adversarial` through the pool
  only (in-process it could hang forever, which is the point). The number to read is the
  worst-case per-sample latency against the budget.
* **math-suite**: math-verify's own regression cases (``tests/data/math_verify_cases.json`` in a
  checkout, or ``--math-cases PATH``), each scored raw and ``<answer>``-wrapped with the math
  verifier's caches cleared first, in-process and through the pool. The mixed batch repeats a few
  short fractions, so its math rows mostly measure cache hits; this batch measures parsing and
  comparison of real answers. Reported per case (both scorings), with the worst case's latency
  and the agreement with the suite's expectations.

Latency is per sample: in-process, the time of one ``score`` call; in the pool, from dispatch to
a worker until its result is back (pipe transfer included, queueing excluded).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import uuid
from typing import List, Tuple

from dualrpo_mcore.verifiers.sandbox.adversarial import adversarial_corpus, markers_left
from dualrpo_mcore.verifiers.sandbox.pool import VerifierPool

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_MATH_CASES = os.path.join(_REPO, "tests", "data", "math_verify_cases.json")
TASKS = ("math", "choice", "numeric", "counting", "ocr", "grounding", "detection", "format")
_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
          "fifteen sixteen seventeen eighteen nineteen twenty").split()
_PHRASES = ("STOP AHEAD", "No parking any time", "Exit 12B Main St", "FRESH BREAD DAILY",
            "Platform 9 3/4", "Caution: wet floor", "OPEN 24 HOURS", "Speed limit 35")
_LABELS = ("cat", "dog", "car", "person", "bicycle")


def _think(rng: random.Random) -> str:
    steps = rng.randint(2, 12)
    return "<think>" + " ".join(f"Step {i}: we simplify the expression and check it." for i in range(steps)) + "</think> "


def _jitter(box: List[float], rng: random.Random, scale: float) -> List[float]:
    return [round(v + rng.uniform(-scale, scale), 1) for v in box]


def _box(rng: random.Random) -> List[int]:
    x, y = rng.randint(0, 800), rng.randint(0, 600)
    return [x, y, x + rng.randint(20, 300), y + rng.randint(20, 300)]


def _sample(task: str, ok: bool, rng: random.Random) -> Tuple[dict, str]:
    """One (spec, response) pair; ``ok`` asks for a response that should earn the reward."""
    think = _think(rng)
    if task == "math":
        p, q = rng.randint(1, 50), rng.randint(2, 60)
        shown = rng.choice([f"\\frac{{{p}}}{{{q}}}", f"{p}/{q}", f"\\dfrac{{{2 * p}}}{{{2 * q}}}"])
        if not ok:
            shown = f"\\frac{{{p + 1}}}{{{q}}}"
        return {"verifier": "math", "answer": f"\\frac{{{p}}}{{{q}}}"}, f"{think}<answer>\\boxed{{{shown}}}</answer>"
    if task == "choice":
        opts = [str(rng.randint(1, 99)) for _ in range(4)]
        gold = rng.randrange(4)
        pick = gold if ok else (gold + 1) % 4
        said = rng.choice([f"{'ABCD'[pick]}", f"({'ABCD'[pick]}) {opts[pick]}"])
        return ({"verifier": "choice", "answer": "ABCD"[gold], "params": {"options": opts}},
                f"{think}<answer>{said}</answer>")
    if task == "numeric":
        gold = round(rng.uniform(1, 1000), 2)
        said = gold * (1 + rng.uniform(-0.004, 0.004)) if ok else gold * 1.3
        return ({"verifier": "numeric", "answer": gold, "params": {"rel_tol": 0.01}},
                f"{think}The chart shows about <answer>{said:.2f}</answer>")
    if task == "counting":
        gold = rng.randint(0, 20)
        said = gold if ok else gold + rng.randint(1, 3)
        text = _WORDS[said] if said < len(_WORDS) and rng.random() < 0.5 else str(said)
        return {"verifier": "counting", "answer": gold}, f"{think}<answer>{text}</answer>"
    if task == "ocr":
        gold = rng.choice(_PHRASES)
        said = gold if ok else rng.choice([p for p in _PHRASES if p != gold])
        return {"verifier": "ocr", "answer": gold}, f"{think}<answer>{said}</answer>"
    if task == "grounding":
        gold = _box(rng)
        said = _jitter(gold, rng, 3) if ok else _box(rng)
        return {"verifier": "grounding", "answer": gold}, f"{think}<answer>{json.dumps(said)}</answer>"
    if task == "detection":
        gold = [{"bbox_2d": _box(rng), "label": rng.choice(_LABELS)} for _ in range(rng.randint(1, 6))]
        pred = [dict(g, bbox_2d=_jitter(g["bbox_2d"], rng, 1)) for g in gold] if ok else \
            [{"bbox_2d": _box(rng), "label": rng.choice(_LABELS)} for _ in range(rng.randint(0, 6))]
        return ({"verifier": "detection", "answer": gold, "params": {"iou_threshold": 0.5}},
                f"{think}<answer>{json.dumps(pred)}</answer>")
    body = "<answer>42</answer>" if ok else "The answer is 42."
    return {"verifier": "format", "params": {"mode": "think_answer"}}, think + body


def mixed_batch(n: int, seed: int = 0) -> List[Tuple[dict, str]]:
    """``n`` realistic samples cycling through the eight tasks, about half of them correct."""
    rng = random.Random(seed)
    return [_sample(TASKS[i % len(TASKS)], rng.random() < 0.5, rng) for i in range(n)]


def _summary(name: str, batch: str, latencies: List[float], wall: float, statuses: List[str]) -> dict:
    lat = sorted(latencies)

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else 0.0

    return {"batch": batch, "runner": name, "samples": len(lat), "wall_s": wall,
            "samples_per_s": len(lat) / wall if wall > 0 else float("inf"),
            "p50_s": pct(0.50), "p99_s": pct(0.99), "max_s": lat[-1] if lat else 0.0,
            "timeouts": statuses.count("timeout"), "crashes": statuses.count("crash"),
            "statuses": {s: statuses.count(s) for s in sorted(set(statuses))}}


def _serial(samples) -> dict:
    from dualrpo_mcore.verifiers.scoring import score_with_info

    score_with_info(*samples[0])  # lazy imports are start-up cost, not throughput
    lat, statuses = [], []
    start = time.perf_counter()
    for spec, response in samples:
        t0 = time.perf_counter()
        _, info = score_with_info(spec, response)
        lat.append(time.perf_counter() - t0)
        statuses.append(info["status"])
    return _summary("serial score (in-process)", "mixed", lat, time.perf_counter() - start, statuses)


def load_math_suite(path: str = _MATH_CASES) -> List[Tuple[str, str, bool]]:
    """``(gold, pred, expected)`` rows of math-verify's suite, or ``[]`` when the file is absent."""
    if not path or not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [(c["gold"], c["pred"], bool(c["expected"])) for c in json.load(f)["cases"]]


def math_suite_samples(cases) -> List[Tuple[dict, str]]:
    """Two samples per case: the prediction raw, and wrapped in ``<answer>``."""
    out = []
    for gold, pred, _ in cases:
        spec = {"verifier": "math", "answer": gold}
        out += [(spec, pred), (spec, f"<answer>{pred}</answer>")]
    return out


def _serial_math(cases) -> Tuple[dict, dict]:
    """In-process, per case (raw + wrapped), caches cleared before each case."""
    from dualrpo_mcore.verifiers.tasks.math import clear_caches
    from dualrpo_mcore.verifiers.scoring import score_with_info

    samples = math_suite_samples(cases)
    score_with_info(*samples[0])  # lazy imports are start-up cost
    lat, case_lat, statuses, agree = [], [], [], 0
    start = time.perf_counter()
    for k, (_, _, expected) in enumerate(cases):
        clear_caches()
        best = 0.0
        t_case = time.perf_counter()
        for spec, response in samples[2 * k:2 * k + 2]:
            t0 = time.perf_counter()
            reward, info = score_with_info(spec, response)
            lat.append(time.perf_counter() - t0)
            statuses.append(info["status"])
            best = max(best, reward)
        case_lat.append(time.perf_counter() - t_case)
        agree += (best >= 0.5) == expected
    wall = time.perf_counter() - start
    row = _summary("serial score (in-process)", "math-suite", lat, wall, statuses)
    worst = max(range(len(cases)), key=case_lat.__getitem__)
    summary = {"cases": len(cases), "cases_per_s": len(cases) / wall,
               "worst_case_s": case_lat[worst], "worst_case_index": worst,
               "agreement": agree / len(cases)}
    return row, summary


def _pooled(samples, workers: int, timeout: float, batch: str) -> dict:
    with VerifierPool(num_workers=workers, timeout_s=timeout) as pool:
        pool.wait_ready(300)  # worker start-up (sympy import) is not throughput either
        start = time.perf_counter()
        results = pool.verify_batch([s for s, _ in samples], [r for _, r in samples])
        wall = time.perf_counter() - start
        stats = pool.stats()
    row = _summary(f"pool, {workers} worker{'s' if workers > 1 else ''}", batch,
                   [r.elapsed_s for r in results], wall, [r.status for r in results])
    row["workers_replaced"] = stats["workers_replaced"]
    return row


def _table(rows: List[dict]) -> str:
    """Each row's ratio is against the in-process serial row of its batch, where there is one."""
    serial = {r["batch"]: r["samples_per_s"] for r in rows if r["runner"].startswith("serial")}
    head = (f"{'batch':<12} {'runner':<27} {'samples':>7} {'samples/s':>10} {'p50 ms':>8} "
            f"{'p99 ms':>8} {'max ms':>8} {'timeouts':>8} {'crashes':>7} {'vs serial':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = f"{r['samples_per_s'] / serial[r['batch']]:.2f}x" if r["batch"] in serial else "n/a"
        lines.append(f"{r['batch']:<12} {r['runner']:<27} {r['samples']:>7} {r['samples_per_s']:>10.1f} "
                     f"{r['p50_s'] * 1e3:>8.2f} {r['p99_s'] * 1e3:>8.1f} {r['max_s'] * 1e3:>8.1f} "
                     f"{r['timeouts']:>8} {r['crashes']:>7} {ratio:>9}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=max(1, min(8, (os.cpu_count() or 2))),
                        help="pool workers (default: CPU count, at most 8)")
    parser.add_argument("--timeout", type=float, default=5.0, help="per-sample budget in seconds")
    parser.add_argument("--num-samples", type=int, default=800, help="mixed-batch size")
    parser.add_argument("--num-adversarial", type=int, default=1000, help="adversarial-batch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--math-cases", default=_MATH_CASES, metavar="PATH",
                        help="math-verify suite cases (JSON); without them no math-suite rows")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")


def _announce(row: dict) -> dict:
    """Print a finished row's headline on stderr: the progress line of a run that takes minutes."""
    print(f"  {row['batch']} / {row['runner']}: {row['samples']} samples in {row['wall_s']:.1f} s",
          file=sys.stderr, flush=True)
    return row


def run(args: argparse.Namespace) -> int:
    mixed = mixed_batch(args.num_samples, args.seed)
    token = uuid.uuid4().hex
    adversarial = [(c.spec, c.response) for c in
                   adversarial_corpus(args.num_adversarial, token=token, seed=args.seed)]
    print(f"verifier bench: {len(mixed)} mixed + {len(adversarial)} adversarial samples, "
          f"{args.workers} workers, {args.timeout:g} s budget", flush=True)
    rows = [_announce(_serial(mixed))]
    if args.workers > 1:
        rows.append(_announce(_pooled(mixed, 1, args.timeout, "mixed")))
    rows.append(_announce(_pooled(mixed, args.workers, args.timeout, "mixed")))
    rows.append(_announce(_pooled(adversarial, args.workers, args.timeout, "adversarial")))
    adversarial_row = rows[-1]
    math_cases, math_summary = load_math_suite(args.math_cases), None
    if math_cases:
        serial_row, math_summary = _serial_math(math_cases)
        rows.append(_announce(serial_row))
        rows.append(_announce(_pooled(math_suite_samples(math_cases), args.workers, args.timeout,
                                      "math-suite")))
    print(_table(rows))
    if math_summary:
        print(f"math suite: {math_summary['cases']} cases (raw + <answer>), "
              f"{math_summary['cases_per_s']:.1f} cases/s in-process, worst case "
              f"{math_summary['worst_case_s']:.3f} s (case {math_summary['worst_case_index']}), "
              f"agreement with the suite {100 * math_summary['agreement']:.1f}%")
    else:
        print(f"math suite: skipped, no cases at {args.math_cases!r}")
    worst = adversarial_row["max_s"]
    leaked = markers_left(token)
    print(f"worst-case adversarial latency: {worst:.3f} s (budget {args.timeout:g} s); "
          f"adversarial statuses: {adversarial_row['statuses']}; "
          f"code-execution markers found: {len(leaked)}")
    if args.json:
        from .common import write_json  # imports torch, which the rest of this bench never needs

        write_json(args.json, "verifiers", args, rows, worst_case_adversarial_s=worst, markers_found=leaked,
                   math_suite=math_summary)
    return 1 if leaked else 0
