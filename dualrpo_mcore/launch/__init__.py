"""Launch: nemo-run tasks and executors (local torchrun, Slurm); the memory planner is ``planner/``."""
