"""The tiny CPU recipe launched locally through nemo-run: LocalExecutor + torchrun, 2 gloo processes, TP=2.

    python -m dualrpo_mcore data synth --out outputs/synth --num-per-task 8
    python examples/tiny_cpu.py --data outputs/synth --out outputs/tiny_launch --steps 4
    python examples/tiny_cpu.py --data outputs/synth --out outputs/tiny_launch --dryrun   # print the command

``--init`` takes the warm-started policy of ``dualrpo sft``; without it the tiny policy starts random
(mechanics only). The nemo-run experiment (logs per rank) lands in ``<out>/launch``.
"""
import argparse
import os
import sys

from dualrpo_mcore.launch import cli, nemo


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_job_arguments(p)
    p.add_argument("--steps", type=int, default=4, help="RL steps (default 4)")
    p.add_argument("--reward-mode", default="dualrpo", help="grpo | dualrpo | internal")
    p.add_argument("--nproc", type=int, default=2, help="torchrun processes (default 2)")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size (default 2)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.exp_dir = cli.exp_dir(args)
    job = nemo.TrainJob(recipe="tiny_cpu", data=os.path.abspath(args.data), out=os.path.abspath(args.out),
                        init=os.path.abspath(args.init) if args.init else None, tp=args.tp,
                        extra_args=["--steps", str(args.steps), "--reward-mode", args.reward_mode])
    job.check_world(args.nproc, "--nproc")
    # One thread per process: 2 ranks on a small CPU box otherwise oversubscribe the cores.
    env = {"OMP_NUM_THREADS": "1", **nemo.parse_env(args.env)}
    executor = nemo.local_executor(nemo.LocalOptions(nproc_per_node=args.nproc, env=env))
    return cli.run_and_report("dualrpo-tiny_cpu", [("tiny_cpu", nemo.train_task(job), executor)],
                              args.exp_dir, dryrun=args.dryrun)


if __name__ == "__main__":
    sys.exit(main())
