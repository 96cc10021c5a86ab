"""Process groups (NCCL on GPU, gloo on CPU) and the one place that makes Megatron-Core run on CPU."""
from .setup import ParallelInfo, default_backend, info, init_process_group, initialize, teardown

__all__ = ["ParallelInfo", "default_backend", "info", "init_process_group", "initialize", "teardown"]
