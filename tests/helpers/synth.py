"""A synthetic data dir (``dualrpo data synth``): every task, tiny, the input of the trainer tests."""
from __future__ import annotations

import os
from typing import Optional

from helpers.cli import run_dualrpo


def synth(out, per_task: int = 1, heldout_per_task: Optional[int] = 1, cli: bool = False) -> str:
    """Write the set to ``out`` and return its path as a string.

    In-process by default (no interpreter start-up); ``cli=True`` runs ``dualrpo data synth`` as a
    subprocess, for the end-to-end tests that take every step as a user would. ``heldout_per_task``
    None leaves the CLI's default.
    """
    argv = ["data", "synth", "--out", os.fspath(out), "--num-per-task", str(per_task)]
    if heldout_per_task is not None:
        argv += ["--heldout-per-task", str(heldout_per_task)]
    if cli:
        run_dualrpo(*argv)
    else:
        from dualrpo_mcore.cli import main

        assert main(argv) == 0
    return os.fspath(out)
