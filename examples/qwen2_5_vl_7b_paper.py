"""The DualRPO paper reproduction on Slurm: Qwen2.5-VL-7B-Instruct, Orsta-Data-47k, one 8xH100 node.

    python examples/qwen2_5_vl_7b_paper.py --data /lustre/Orsta-Data-47k/train \\
        --init /lustre/models/Qwen2.5-VL-7B-Instruct --out /lustre/runs/7b_dualrpo \\
        --account ACCT --partition batch --container IMAGE --mount /lustre:/lustre [--grpo | --both] [--dryrun]

``--grpo`` runs the GRPO baseline (recipe ``qwen2_5_vl_7b_paper_grpo``) instead of DualRPO; ``--both``
submits both as one nemo-run experiment (runs in ``<out>/dualrpo`` and ``<out>/grpo``) for the
paper's comparison. Data: ``--data`` is the ``train/`` folder of Orsta-Data-47k as downloaded
(``huggingface-cli download --repo-type dataset One-RL-to-See-Them-All/Orsta-Data-47k``): its parquet
files are read as published, with V-Triune's rewards (``data.reward_profile='vtriune'``), prompt
instructions and image sizing (see trainer/recipes_paper.py and docs/vtriune.md).
"""
import argparse
import os
import sys

from dualrpo_mcore.launch import cli, nemo
from dualrpo_mcore.trainer.recipes_paper import default_world, discover_orsta

RECIPES = {"dualrpo": "qwen2_5_vl_7b_paper", "grpo": "qwen2_5_vl_7b_paper_grpo"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_job_arguments(p)
    variant = p.add_mutually_exclusive_group()
    variant.add_argument("--grpo", action="store_true", help="the GRPO baseline instead of DualRPO")
    variant.add_argument("--both", action="store_true", help="DualRPO and GRPO as two jobs of one experiment")
    p.add_argument("--steps", type=int, default=None, help="RL steps (default: one epoch, the recipe's)")
    cli.add_slurm_arguments(p.add_argument_group("slurm"), time="2-00:00:00")
    return p.parse_args(argv)


def check_data(data: str) -> None:
    """Orsta's train files, as the recipe reads them; a folder without them would train on nothing."""
    if not discover_orsta(data):
        raise nemo.LaunchError(f"--data {data}: no Orsta train files (train_{{task}}_{{source}}_{{n}}.parquet); "
                               "pass the train/ folder of Orsta-Data-47k as downloaded")


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.path.isdir(args.data):  # a path only the cluster mounts cannot be looked into from here
        check_data(args.data)
    args.exp_dir = cli.exp_dir(args)
    variants = ["dualrpo", "grpo"] if args.both else ["grpo" if args.grpo else "dualrpo"]
    nodes, gpus = default_world(RECIPES["dualrpo"])
    jobs = []
    for variant in variants:
        out = os.path.join(args.out, variant) if args.both else args.out
        job = nemo.TrainJob(recipe=RECIPES[variant], data=args.data, out=out, init=args.init,
                            extra_args=["--steps", str(args.steps)] if args.steps else [])
        opts = cli.slurm_options(args, nodes, gpus)
        job.check_world(opts.world, "nodes x GPUs")
        if opts.requeue:  # a requeued attempt reruns the command: it continues from its newest checkpoint
            job.extra_args = cli.resume_auto(job.extra_args)
        jobs.append((variant, nemo.train_task(job), nemo.slurm_executor(opts, exp_base_dir=args.exp_dir,
                                                                         run_dir=job.out)))
    return cli.run_and_report("dualrpo-7b-paper", jobs, args.exp_dir, dryrun=args.dryrun, detach=args.detach)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except nemo.LaunchError as e:
        sys.exit(f"qwen2_5_vl_7b_paper.py: {e}")
