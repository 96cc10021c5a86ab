"""Run a function on N local processes joined in one torch.distributed group.

Used by the distributed tests (gloo on CPU) and by small CPU tools. Each rank's return value
comes back to the caller; an exception on any rank is re-raised here with that rank's
traceback, so a failing rank never turns into a silent hang.
"""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue as queue_mod
import socket
import traceback
from typing import Any, Callable, List


def free_port() -> int:
    """A port that was free a moment ago. Racy by nature (another process may take it before it is
    bound again): prefer :func:`rendezvous_store`, which keeps the port it binds."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rendezvous_store(world_size: int):
    """A TCP store served by this process on a port the OS picks and this process keeps holding.

    Binding port 0 and never letting go is what makes two suites on one machine unable to collide:
    a fixed port (or one probed free, released, then bound again) can be taken in between.
    """
    import torch.distributed as dist

    return dist.TCPStore("127.0.0.1", 0, world_size + 1, is_master=True, wait_for_workers=False)


def _worker(fn, rank, world_size, port, backend, threads, args, out):
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    # Oversubscribing 2 cores with N processes x N threads makes gloo tests crawl.
    torch.set_num_threads(threads)
    try:
        store = dist.TCPStore("127.0.0.1", port, is_master=False)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        buf = io.BytesIO()
        torch.save(result, buf)
        out.put((rank, True, buf.getvalue()))
    except BaseException:  # noqa: BLE001 - everything must reach the parent
        out.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo",
                    timeout: float = 300.0, threads: int = 1) -> List[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes.

    ``fn`` must be importable by module path (a module-level function). Returns the per-rank
    results in rank order.
    """
    import torch

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    store = rendezvous_store(world_size)
    port = store.port
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, backend, threads, args, out),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict = {}
    errors: list = []
    try:
        while len(results) + len(errors) < world_size:
            try:
                rank, ok, payload = out.get(timeout=timeout)
            except queue_mod.Empty:
                dead = [i for i, p in enumerate(procs) if not p.is_alive() and p.exitcode]
                raise TimeoutError(f"distributed run timed out after {timeout}s "
                                   f"(ranks exited abnormally: {dead})") from None
            if ok:
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors.append((rank, payload))
                break  # the other ranks may be stuck in a collective: do not wait for them
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
        del store  # the server goes with the last reference, and the port with it
    if errors:
        rank, tb = errors[0]
        raise RuntimeError(f"rank {rank} of {world_size} failed:\n{tb}")
    return [results[r] for r in range(world_size)]
