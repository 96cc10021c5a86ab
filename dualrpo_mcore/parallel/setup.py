"""Process-group and model-parallel setup: NCCL on GPU, gloo on CPU (through :mod:`cpu_compat`)."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelInfo:
    """Where this process sits in the model-parallel grid."""

    tp_size: int
    pp_size: int
    dp_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    backend: str

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def global_rank() -> int:
    """This process's rank in the default group; before (or without) one, the launcher's ``RANK``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_process_group(backend: str | None = None, timeout_minutes: int = 30) -> str:
    """Join the default process group from the usual env vars (torchrun); a single process without
    ``MASTER_PORT`` gets an in-process store, so no port is ever assumed free.

    Returns the backend in use. Already-initialised groups are kept as they are.
    """
    backend = backend or default_backend()
    if dist.is_initialized():
        return dist.get_backend()
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    store = None
    if "MASTER_PORT" not in os.environ:
        if world != 1:
            raise RuntimeError(f"WORLD_SIZE={world} but MASTER_PORT is not set: start the ranks with torchrun "
                               f"(which sets MASTER_ADDR/MASTER_PORT) or set both yourself")
        # One process needs no rendezvous. A default port made two single-process runs on one
        # machine fail with EADDRINUSE; an in-process store cannot collide with anything.
        store = dist.HashStore()
    else:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=timeout_minutes))
    return backend


def initialize(tp: int = 1, pp: int = 1, backend: str | None = None, seed: int = 1234,
               timeout_minutes: int = 30) -> ParallelInfo:
    """Set up Megatron-Core's model-parallel state for ``tp`` x ``pp`` (data parallel = the rest).

    On CPU this first routes Megatron's CUDA calls to CPU, so the same code path serves tests, the
    CPU demo and GPU clusters. Seeds the model-parallel RNG tracker (distinct per TP rank).
    """
    from megatron.core import parallel_state, tensor_parallel

    backend = backend or default_backend()
    if backend == "gloo":
        from . import cpu_compat

        cpu_compat.enable()
    init_process_group(backend, timeout_minutes)
    world = dist.get_world_size()
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not divisible by tp*pp = {tp}*{pp}")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        distributed_timeout_minutes=timeout_minutes,
        # gloo is already the main backend on CPU; extra gloo groups only cost time there.
        create_gloo_process_groups=backend != "gloo")
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return info()


def info() -> ParallelInfo:
    from megatron.core import parallel_state as ps

    return ParallelInfo(
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        dp_size=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        backend=dist.get_backend() if dist.is_initialized() else "none",
    )


def teardown() -> None:
    """Destroy Megatron's model-parallel groups (the default group is left to its owner)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()


def shutdown() -> None:
    """A command's way out of the run it started: :func:`teardown`, then the default group."""
    teardown()
    if dist.is_initialized():
        dist.destroy_process_group()
