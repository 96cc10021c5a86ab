"""Rendezvous without fixed ports: two suites (or two single-process runs) on one machine never collide."""
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dualrpo_mcore.parallel import init_process_group
from dualrpo_mcore.parallel.spawn import run_distributed

ROOT = Path(__file__).resolve().parents[2]


def _allreduce(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return float(t)


def test_two_launches_at_once_do_not_collide():
    results, errors = [], []

    def launch():
        try:
            results.append(run_distributed(_allreduce, 2, timeout=120))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=launch) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results == [[3.0, 3.0], [3.0, 3.0]]


SINGLE = """
import time, torch.distributed as dist
from dualrpo_mcore.parallel import init_process_group
init_process_group("gloo")
dist.barrier()
time.sleep(2)  # both processes hold their group at the same time
print(dist.get_world_size())
"""


def test_single_process_runs_need_no_port():
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    procs = [subprocess.Popen([sys.executable, "-c", SINGLE], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert [o[0].strip() for o in outs] == ["1", "1"]


def test_a_world_without_master_port_is_refused(monkeypatch):
    assert not dist.is_initialized()
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="torchrun"):
        init_process_group("gloo")


# A literal port beside MASTER_PORT, a tcp:// init method or a torchrun endpoint flag.
_PORT = re.compile(r"MASTER_PORT['\"]?\s*[,=:]\s*(str\()?['\"]?\d{2,5}|tcp://[\w.\-]+:\d{2,5}|"
                   r"--(master[-_]port|rdzv[-_]endpoint)[ =][^\s'\"]*\d{2,5}")
# The multi-node Slurm launch names the port torchrun listens on across nodes (a `--rdzv-port`
# option, default torchrun's 29500, on exclusive nodes); it is the one place a port must be agreed.
_ALLOWED = {"tests/unit/test_launch.py"}


def test_no_rendezvous_port_is_hard_coded():
    files = [p for d in ("dualrpo_mcore", "tests", "scripts", "examples") for p in (ROOT / d).rglob("*")
             if p.suffix in (".py", ".sh") and p.is_file()] + [ROOT / "Makefile", ROOT / ".ci" / "run"]
    hits = []
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        if rel in _ALLOWED or rel == "tests/distributed/test_rendezvous.py":
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if _PORT.search(line):
                hits.append(f"{rel}:{n}: {line.strip()}")
    assert not hits, "hard-coded rendezvous ports:\n" + "\n".join(hits)
