"""Scaling study: model size x node count as one nemo-run experiment, one Slurm job per cell.

    python examples/scaling_study.py --data /lustre/orsta --out /lustre/runs/scaling \\
        --init-7b /lustre/models/Qwen2.5-VL-7B-Instruct --init-32b /lustre/models/Qwen2.5-VL-32B-Instruct \\
        --account ACCT --partition batch --container IMAGE --mount /lustre:/lustre \\
        --models 7b 32b --nodes 1 2 4 --steps 20 [--dryrun]

Each cell runs ``--steps`` RL steps (default 20: a throughput measurement, not a training run) of the
model's paper-scale recipe at its default TP/PP with data parallelism over the remaining GPUs,
writing ``<out>/<model>_n<nodes>`` (compare ``time/*`` in each ``metrics.jsonl``). The prompts per
step stay the recipe's, so this is strong scaling. A cell whose world does not split into TP x PP
(e.g. 32B at TP=4, PP=4 on fewer than 2 nodes) is skipped and reported. ``--dryrun`` prints every job's script.
"""
import argparse
import os
import sys

from dualrpo_mcore.launch import cli, nemo

MODELS = {"7b": "qwen2_5_vl_7b_paper", "32b": "qwen2_5_vl_32b"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_job_arguments(p)
    for m in MODELS:
        p.add_argument(f"--init-{m}", default=None, help=f"HF directory of Qwen2.5-VL-{m.upper()}-Instruct")
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS), help="model sizes")
    p.add_argument("--nodes", nargs="+", type=int, default=[1, 2, 4], help="node counts (default 1 2 4)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--steps", type=int, default=20, help="RL steps per cell (default 20)")
    cli.add_slurm_arguments(p.add_argument_group("slurm"), time="06:00:00")
    return p.parse_args(argv)


def cells(args):
    """``(name, job, options)`` per runnable cell, and the notes of the skipped ones."""
    out, skipped = [], []
    for model in args.models:
        init = getattr(args, f"init_{model}")
        if not init:
            raise nemo.LaunchError(f"--init-{model} is required: the SGLang rollout engine reads the HF directory")
        for nodes in args.nodes:
            name = f"{model}_n{nodes}"
            job = nemo.TrainJob(recipe=MODELS[model], data=args.data, out=os.path.join(args.out, name), init=init,
                                extra_args=["--steps", str(args.steps)])
            opts = cli.slurm_options(args, nodes, args.gpus_per_node)
            if opts.requeue:  # a requeued attempt reruns the command: it continues from its newest checkpoint
                job.extra_args = cli.resume_auto(job.extra_args)
            try:
                job.check_world(opts.world, name)
            except nemo.LaunchError as e:
                skipped.append(str(e))
                continue
            out.append((name, job, opts))
    return out, skipped


def main(argv=None) -> int:
    args = parse_args(argv)
    args.exp_dir = cli.exp_dir(args)
    runnable, skipped = cells(args)
    for note in skipped:
        print(f"scaling_study: skipped {note}", file=sys.stderr)
    if not runnable:
        print("scaling_study: no runnable cell", file=sys.stderr)
        return 2
    jobs = [(name, nemo.train_task(job), nemo.slurm_executor(opts, exp_base_dir=args.exp_dir, run_dir=job.out))
            for name, job, opts in runnable]
    return cli.run_and_report("dualrpo-scaling", jobs, args.exp_dir, dryrun=args.dryrun, detach=args.detach)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except nemo.LaunchError as e:
        sys.exit(f"scaling_study.py: {e}")
