#!/usr/bin/env python
"""Ask pip's resolver whether the package's extras install together, per Python.

For each interpreter and extra it runs, from the repository root,

    PY -m pip install --dry-run --ignore-installed --report OUT/<extra>-py<ver>.json [--no-build-isolation] .[extra]

and prints what the resolver chose for the packages that matter to us (megatron-core, torch,
transformers, sglang, Transformer Engine). ``--dry-run`` installs nothing, but pip still downloads
every wheel it resolves (SGLang's tree is several GB: torch, flashinfer, sglang-kernel, ...), so this
is a by-hand check, run when a range changes; its last results are in docs/compatibility.md, and
tests/unit/test_extras_ranges.py checks cheaply that the declared ranges agree with them.

Without build isolation (the default, as our own install runs) an sdist's metadata is built against
the interpreter's torch: transformer_engine_torch, which ships only as an sdist, fails that on a CPU
torch. ``--isolation`` lets pip build it in an isolated environment instead (which installs a torch there).

    python scripts/check_extras_resolve.py --python .venv/bin/python --python .venv312/bin/python
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WATCH = ("megatron-core", "torch", "transformers", "sglang", "transformer-engine", "transformer-engine-torch")


def canon(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def summarize(report: dict) -> Dict[str, str]:
    """{package: version} the resolver chose, for the packages in ``WATCH``."""
    chosen = {canon(item["metadata"]["name"]): item["metadata"]["version"] for item in report.get("install", [])}
    return {name: chosen[name] for name in WATCH if name in chosen}


def resolve(python: str, extra: str, out_dir: str, isolation: bool = False) -> tuple:
    """(ok, chosen versions or None, last lines of pip's output)."""
    ver = subprocess.run([python, "-c", "import sys; print('%d%d' % sys.version_info[:2])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    report = os.path.join(out_dir, f"{extra}-py{ver}.json")
    cmd = [python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--report", report,
           *([] if isolation else ["--no-build-isolation"]), f".[{extra}]"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    tail = "\n".join(line for line in (res.stdout + res.stderr).splitlines()
                     if not line.startswith("WARNING: Location"))[-2000:]
    if res.returncode != 0 or not os.path.exists(report):
        return False, None, tail
    with open(report) as f:
        return True, summarize(json.load(f)), tail


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--python", action="append", default=None, help="interpreter (repeatable; default: this one)")
    p.add_argument("--extras", nargs="+", default=["sglang", "te"])
    p.add_argument("--out", default="/tmp/dualrpo-resolve", help="where pip's JSON reports go")
    p.add_argument("--isolation", action="store_true", help="let pip build sdists' metadata in isolation")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    failed = 0
    for python in args.python or [sys.executable]:
        for extra in args.extras:
            ok, chosen, tail = resolve(python, extra, args.out, args.isolation)
            what = ", ".join(f"{k} {v}" for k, v in chosen.items()) if ok else "FAILED"
            print(f"{python} [{extra}]: {what}", flush=True)
            if not ok:
                failed += 1
                print("    " + tail.replace("\n", "\n    "), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
