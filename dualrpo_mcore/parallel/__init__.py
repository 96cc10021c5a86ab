"""Process groups (NCCL on GPU, gloo on CPU) and the one place that makes Megatron-Core run on CPU."""
