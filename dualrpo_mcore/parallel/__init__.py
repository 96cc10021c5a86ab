"""Process groups (NCCL on GPU, gloo on CPU) and the one place that makes Megatron-Core run on CPU."""
from .setup import (ParallelInfo, default_backend, global_rank, info, init_process_group, initialize, shutdown,
                    teardown)

__all__ = ["ParallelInfo", "default_backend", "global_rank", "info", "init_process_group", "initialize", "shutdown",
           "teardown"]
