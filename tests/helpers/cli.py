"""``python -m dualrpo_mcore ...`` in a subprocess, the way a user runs the CLI."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional

ROOT = Path(__file__).resolve().parents[2]
# Spelled out although conftest.py sets them too: a caller's env must not turn the hub back on.
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def run_dualrpo(*args, timeout: float = 300, threads: Optional[int] = 1, env: Optional[Dict[str, str]] = None,
                check: bool = True) -> subprocess.CompletedProcess:
    """Run the CLI from the repository root, offline, output captured as text.

    ``threads`` sets OMP_NUM_THREADS (None: inherited), since two ranks on 2 shared cores crawl when
    each takes every core. ``check``: assert exit 0 with the output's tail as the message; tests that
    check a failing exit pass False and read ``returncode`` themselves.
    """
    full = dict(os.environ, **OFFLINE)
    if threads is not None:
        full["OMP_NUM_THREADS"] = str(threads)
    full.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "dualrpo_mcore", *map(str, args)], cwd=ROOT, env=full,
                          timeout=timeout, capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc
