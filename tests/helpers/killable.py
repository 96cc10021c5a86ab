"""Run ``dualrpo train`` as N ranks that may really die (SIGKILL from the fault hook), cheaply.

``torchrun`` per launch costs ~15 s of interpreter start and imports on 2 cores, and the fault matrix
needs ~30 launches. Here a fork server (``multiprocessing``'s ``forkserver`` start method, a fresh
process, not this pytest one) imports torch, Megatron, transformers and the trainer once; each rank of
each launch is forked from it and runs the real CLI entry point (``dualrpo_mcore.cli.main``) with the
environment torchrun would give it (RANK, WORLD_SIZE, MASTER_ADDR/PORT of a store this process serves).
A rank killed by the hook is gone without cleanup, exactly as under torchrun; its peers, once one rank
has died, get a short grace and are then killed, as torchrun's agent does.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import time
import traceback
from typing import Dict, List, Optional, Sequence

# What every rank imports anyway, imported once in the fork server.
PRELOAD = ["torch", "torch.distributed", "numpy", "transformers", "megatron.core", "dualrpo_mcore.cli",
           "dualrpo_mcore.commands.train", "dualrpo_mcore.trainer.loop", "dualrpo_mcore.actor.actor",
           "dualrpo_mcore.actor.megatron_setup", "dualrpo_mcore.trainer.checkpoint", "dualrpo_mcore.trainer.recipes",
           "dualrpo_mcore.rollout.hf_engine", "dualrpo_mcore.rollout.sync", "dualrpo_mcore.verifiers.sandbox.pool",
           "dualrpo_mcore.data", "megatron.core.dist_checkpointing", "torch.utils.tensorboard"]


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # no-op if this interpreter's fork server already runs
    return ctx


def _rank_main(rank: int, world: int, port: int, argv: List[str], env: Dict[str, str], log_path: str) -> None:
    os.environ.update(env)
    # As under torchrun: the launcher (here the test process) serves the rendezvous store on a port
    # it keeps bound, and every rank connects to it as a client, so no port is probed and released.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), TORCHELASTIC_USE_AGENT_STORE="True", OMP_NUM_THREADS="1",
                      TOKENIZERS_PARALLELISM="false")
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    rc = 1
    try:
        import torch

        torch.set_num_threads(1)
        from dualrpo_mcore.cli import main

        rc = int(main(argv) or 0)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - the test reads the log
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)  # no atexit of the fork server's parent, no second cleanup


class Launch:
    """The outcome of one launch: exit codes per rank (negative: killed by that signal) and logs."""

    def __init__(self, codes: List[int], logs: List[str], timed_out: bool = False):
        self.codes, self.logs, self.timed_out = codes, logs, timed_out

    def log(self, rank: int = 0) -> str:
        with open(self.logs[rank], errors="replace") as f:
            return f.read()

    @property
    def killed(self) -> bool:
        return not self.timed_out and all(c == -signal.SIGKILL for c in self.codes)

    def __repr__(self) -> str:
        tails = "\n".join(f"--- rank {r} (exit {c}):\n{self.log(r)[-3000:]}" for r, c in enumerate(self.codes))
        return f"Launch(codes={self.codes}, timed_out={self.timed_out})\n{tails}"


def launch(argv: Sequence[str], world: int, log_dir: str, name: str, env: Optional[Dict[str, str]] = None,
           timeout: float = 300.0, grace: float = 30.0) -> Launch:
    """Run ``dualrpo <argv>`` on ``world`` forked ranks; logs ``<log_dir>/<name>.rank<r>.log``."""
    import torch.distributed as dist

    ctx = _context()
    store = dist.TCPStore("127.0.0.1", 0, world + 1, is_master=True, wait_for_workers=False)
    port = store.port
    logs = [os.path.join(log_dir, f"{name}.rank{r}.log") for r in range(world)]
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, list(argv), dict(env or {}), logs[r]))
             for r in range(world)]
    for p in procs:
        p.start()
    deadline, first_death, timed_out = time.monotonic() + timeout, None, False
    while any(p.exitcode is None for p in procs):
        now = time.monotonic()
        if first_death is None and any(p.exitcode not in (None, 0) for p in procs):
            first_death = now
        timed_out |= now > deadline
        if timed_out or (first_death is not None and now - first_death > grace):
            for p in procs:
                if p.exitcode is None:
                    p.kill()
        for p in procs:
            p.join(timeout=0.1)
    del store  # the port goes back once every rank is gone
    return Launch([p.exitcode for p in procs], logs, timed_out)
