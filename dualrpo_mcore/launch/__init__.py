"""Launch and scale: nemo-run recipes (local torchrun, Slurm) and the per-GPU memory planner."""
