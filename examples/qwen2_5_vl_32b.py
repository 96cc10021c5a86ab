"""DualRPO on Qwen2.5-VL-32B-Instruct over several 8xH100 nodes (Slurm): TP=4, PP=4, full recompute.

    python examples/qwen2_5_vl_32b.py --data /lustre/orsta --init /lustre/models/Qwen2.5-VL-32B-Instruct \\
        --out /lustre/runs/32b --account ACCT --partition batch --container IMAGE --mount /lustre:/lustre \\
        [--nodes 4] [--reward-mode grpo] [--dryrun]

One torchrun per node (c10d rendezvous on the first node); the world (nodes x 8) must split into
TP x PP x DP (TP=4, PP=4: any node count of 8 GPUs each; 4 nodes give DP=2).
"""
import argparse
import sys

from dualrpo_mcore.launch import cli, nemo
from dualrpo_mcore.trainer.recipes_paper import default_world

RECIPE = "qwen2_5_vl_32b"


def parse_args(argv=None):
    nodes, gpus = default_world(RECIPE)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_job_arguments(p)
    p.add_argument("--nodes", type=int, default=nodes, help=f"nodes (default {nodes})")
    p.add_argument("--gpus-per-node", type=int, default=gpus, help=f"GPUs per node (default {gpus})")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default: the recipe's, 4)")
    p.add_argument("--pp", type=int, default=None, help="pipeline-parallel size (default: the recipe's, 4)")
    p.add_argument("--reward-mode", default=None, help="grpo | dualrpo | internal (default: dualrpo)")
    p.add_argument("--steps", type=int, default=None, help="RL steps (default: one epoch)")
    cli.add_slurm_arguments(p.add_argument_group("slurm"), time="3-00:00:00")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.exp_dir = cli.exp_dir(args)
    extra = (["--steps", str(args.steps)] if args.steps else []) + \
        (["--reward-mode", args.reward_mode] if args.reward_mode else [])
    job = nemo.TrainJob(recipe=RECIPE, data=args.data, out=args.out, init=args.init, tp=args.tp, pp=args.pp,
                        extra_args=extra)
    opts = cli.slurm_options(args, args.nodes, args.gpus_per_node)
    job.check_world(opts.world, "--nodes x --gpus-per-node")
    if opts.requeue:  # a requeued attempt reruns the command: it continues from its newest checkpoint
        job.extra_args = cli.resume_auto(job.extra_args)
    executor = nemo.slurm_executor(opts, exp_base_dir=args.exp_dir, run_dir=job.out)
    return cli.run_and_report("dualrpo-32b", [(RECIPE, nemo.train_task(job), executor)], args.exp_dir,
                              dryrun=args.dryrun, detach=args.detach)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except nemo.LaunchError as e:
        sys.exit(f"qwen2_5_vl_32b.py: {e}")
