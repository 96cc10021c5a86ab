"""``dualrpo launch``: run a recipe's ``dualrpo train`` through nemo-run, locally or on Slurm.

    dualrpo launch --recipe tiny_cpu --data DATA --out RUN --executor local -- --steps 2
    dualrpo launch --recipe qwen2_5_vl_7b_paper --data /data/orsta --init /models/Qwen2.5-VL-7B-Instruct \\
        --out /runs/7b --executor slurm --account ACCT --partition batch --container IMG \\
        --mount /lustre:/lustre --dryrun

Arguments after ``--`` go to ``dualrpo train``. ``--nodes``/``--gpus-per-node`` default to the
recipe's world (``trainer.recipes.default_world``). The nemo-run experiment (metadata, logs,
sbatch scripts) lives in ``--exp-dir`` (default ``<out>/launch``). Paths are passed to the job
as given: on Slurm they must be valid inside the container (mount them with ``--mount``).
"""
from __future__ import annotations

import argparse
import os
import sys

from .nemo import OK_STATES

EXECUTORS = ("local", "slurm")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n", 1)[1]
    parser.add_argument("--recipe", required=True, help="recipe name (see `dualrpo train --help`)")
    add_job_arguments(parser)
    parser.add_argument("--executor", choices=EXECUTORS, default="local", help="where to run (default: local)")
    parser.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default: the recipe's)")
    parser.add_argument("--pp", type=int, default=None, help="pipeline-parallel size (default: the recipe's)")
    parser.add_argument("--name", default=None, help="experiment title (default: dualrpo-<recipe>)")
    loc = parser.add_argument_group("local executor")
    loc.add_argument("--nproc-per-node", type=int, default=None,
                     help="torchrun processes (default: the recipe's GPUs per node; tiny_cpu: 2)")
    slurm = parser.add_argument_group("slurm executor")
    slurm.add_argument("--nodes", type=int, default=None, help="nodes (default: the recipe's)")
    slurm.add_argument("--gpus-per-node", type=int, default=None, help="GPUs per node (default: the recipe's, 8)")
    add_slurm_arguments(slurm)
    parser.add_argument("train_args", nargs="*", metavar="-- TRAIN_ARGS", help="extra `dualrpo train` arguments")


def add_job_arguments(parser) -> None:
    """Flags every launch has (also used by examples/)."""
    parser.add_argument("--data", required=True, help="data directory, as the job sees it")
    parser.add_argument("--out", required=True, help="run directory, as the job sees it")
    parser.add_argument("--init", default=None, help="initial policy (HF directory), as the job sees it")
    parser.add_argument("--exp-dir", default=None, help="nemo-run experiment dir (default: <out>/launch)")
    parser.add_argument("--env", action="append", default=[], metavar="K=V", help="extra job environment (repeat)")
    parser.add_argument("--dryrun", action="store_true", help="print the generated job script(s); launch nothing")
    parser.add_argument("--detach", action="store_true", help="return once submitted (Slurm) instead of waiting")


def add_slurm_arguments(group, time: str = "04:00:00") -> None:
    """The cluster flags of :class:`~.nemo.SlurmOptions` (also used by examples/)."""
    group.add_argument("--account", default=os.environ.get("SLURM_ACCOUNT"), help="Slurm account ($SLURM_ACCOUNT)")
    group.add_argument("--partition", default=os.environ.get("SLURM_PARTITION"), help="partition ($SLURM_PARTITION)")
    group.add_argument("--time", default=time, help=f"wall-clock limit [D-]HH:MM[:SS] (default {time})")
    group.add_argument("--container", default=None,
                       help="container image with dualrpo-mcore installed (default: bare metal, this interpreter)")
    group.add_argument("--no-gpus", dest="gpus", action="store_false",
                       help="CPU nodes: request no GPUs; --gpus-per-node is then the processes per node (gloo)")
    group.add_argument("--signal", default=None, metavar="SIG[@SECS]",
                       help="sbatch --signal, e.g. USR1@120: warn the job before its time limit so it checkpoints "
                            "and exits 75 (B: is refused: the batch shell cannot pass it on)")
    group.add_argument("--rdzv-port", type=int, default=29500, help="torchrun c10d port on the first node")
    group.add_argument("--requeue", action="store_true",
                       help="sbatch --requeue, and the job requeues itself when the trainer stopped on a signal "
                            "after a checkpoint; the train args get --resume auto")
    group.add_argument("--max-requeues", type=int, default=10,
                       help="with --requeue: requeue the job at most this many times (default 10)")
    group.add_argument("--mount", action="append", default=[], metavar="SRC:DST", help="container mount (repeat)")
    group.add_argument("--job-dir", default=None, help="sbatch scripts + logs on the shared FS (default: --exp-dir)")
    group.add_argument("--ssh-host", default=None, help="submit through SSH to this login node")
    group.add_argument("--ssh-user", default=None, help="SSH user for --ssh-host")
    group.add_argument("--ib-hca", default="mlx5", help="NCCL_IB_HCA ('' leaves it unset)")
    group.add_argument("--socket-ifname", default="^lo,docker", help="NCCL_SOCKET_IFNAME ('' leaves it unset)")
    group.add_argument("--packager", default="none", help="none (image's install) | git (ship HEAD)")


def slurm_options(args, nodes: int, gpus_per_node: int):
    """:class:`~.nemo.SlurmOptions` from flags added by :func:`add_slurm_arguments` (checked there)."""
    from . import nemo

    return nemo.SlurmOptions(
        account=args.account, container_image=args.container, partition=args.partition, time=args.time,
        nodes=nodes, gpus_per_node=gpus_per_node, container_mounts=args.mount, job_dir=args.job_dir,
        ssh_host=args.ssh_host, ssh_user=args.ssh_user, ib_hca=args.ib_hca or None,
        socket_ifname=args.socket_ifname or None, env=nemo.parse_env(args.env), packager=args.packager,
        gpus=args.gpus, signal=args.signal, requeue=args.requeue, max_requeues=args.max_requeues,
        rdzv_port=args.rdzv_port)


def build_executor(args, recipe_world, run_dir=None):
    """``(executor, world size)`` from the parsed flags; bad flags raise ``LaunchError`` naming them.
    ``run_dir``: the job's ``--out``, where the Slurm job script looks for the preemption marker."""
    from . import nemo

    nodes, gpus = recipe_world
    if args.executor == "local":
        if args.nodes not in (None, 1):
            raise nemo.LaunchError(f"--nodes {args.nodes}: the local executor runs on one node")
        nproc = args.nproc_per_node or args.gpus_per_node or gpus
        opts = nemo.LocalOptions(nproc_per_node=nproc, env=nemo.parse_env(args.env))
        return nemo.local_executor(opts), nproc
    opts = slurm_options(args, args.nodes or nodes, args.gpus_per_node or gpus)
    if not args.dryrun:
        nemo.check_slurm(opts)
    return nemo.slurm_executor(opts, exp_base_dir=args.exp_dir, run_dir=run_dir), opts.world


def exp_dir(args) -> str:
    """The experiment base dir; a dry run whose dir cannot be created here (a cluster path) uses a temp dir."""
    path = os.path.abspath(args.exp_dir or os.path.join(args.out, "launch"))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        if not args.dryrun:
            from .nemo import LaunchError

            raise LaunchError(f"--exp-dir {path}: cannot create it ({e})") from None
        import tempfile

        path = tempfile.mkdtemp(prefix="dualrpo-launch-")
        print(f"launch: dry run: {e.filename} is not writable here; experiment dir {path}", file=sys.stderr)
    return path


def _train_args(args) -> list:
    extra = list(args.train_args)
    extra = extra[1:] if extra[:1] == ["--"] else extra
    return resume_auto(extra) if args.executor == "slurm" and getattr(args, "requeue", False) else extra


def resume_auto(extra: list) -> list:
    """A requeued job reruns the same command: it must continue from its newest checkpoint."""
    from .nemo import LaunchError

    given = [extra[i + 1] if a == "--resume" and i + 1 < len(extra) else a.partition("=")[2]
             for i, a in enumerate(extra) if a == "--resume" or a.startswith("--resume=")]
    if not given:
        return extra + ["--resume", "auto"]
    if given[-1] != "auto":
        raise LaunchError(f"--requeue with `-- --resume {given[-1]}`: every requeued attempt would restart "
                          f"from that checkpoint; use --resume auto (the newest in the run dir)")
    return extra


def launch(args) -> int:
    """Build the job, run (or dry-run) it and report; returns the exit status (:func:`status`)."""
    from dualrpo_mcore.trainer.recipes import default_world

    from . import nemo

    nemo.require_nemo_run()
    local = args.executor == "local"
    # Locally and on bare-metal Slurm the job's cwd is nemo-run's, so paths are made absolute; in a
    # container they are container paths, left as given.
    fix = os.path.abspath if local or not getattr(args, "container", None) else (lambda p: p)
    job = nemo.TrainJob(recipe=args.recipe, data=fix(args.data), out=fix(args.out),
                        init=fix(args.init) if args.init else None, tp=args.tp, pp=args.pp,
                        extra_args=_train_args(args))
    args.exp_dir = exp_dir(args)
    executor, world = build_executor(args, default_world(args.recipe), run_dir=job.out)
    job.check_world(world, "--nproc-per-node" if local else "--nodes x --gpus-per-node")
    title = args.name or f"dualrpo-{args.recipe}"
    return run_and_report(title, [(args.recipe, nemo.train_task(job), executor)], args.exp_dir,
                          dryrun=args.dryrun, detach=args.detach)


def report(result) -> None:
    for name, script in result.scripts.items():
        print(f"# ---- job {name}: generated by nemo-run (dry run, nothing launched) ----")
        print(script)
    for name, state in result.states.items():
        if name in result.preempted:
            print(f"launch: job {name}: {state} with exit status {result.exit_codes[name]}: stopped on a signal "
                  f"after a checkpoint; resubmit with `-- --resume auto` (or launch with --requeue)")
            continue
        print(f"launch: job {name}: {state}")
        if state not in OK_STATES:
            for log in result.logs.get(name, []):
                print(f"launch: log {log}")
    if not result.scripts:
        print(f"launch: experiment dir {result.experiment_dir}")


def run_and_report(title: str, jobs, exp_dir: str, *, dryrun: bool, detach: bool = False) -> int:
    """Run (or dry-run) ``jobs`` as one experiment, print what happened; returns :func:`status`."""
    from . import nemo

    result = nemo.run_experiment(title, jobs, exp_dir, dryrun=dryrun, detach=detach)
    report(result)
    return status(result)


def status(result) -> int:
    """0 when every job succeeded (or was submitted), 75 when the only trouble is jobs stopped on a
    signal after a checkpoint (resubmit them), else 1."""
    from dualrpo_mcore.trainer.preempt import REQUEUE_EXIT

    if result.ok:
        return 0
    troubled = [n for n, s in result.states.items() if s not in OK_STATES]
    return REQUEUE_EXIT if troubled and set(troubled) <= set(result.preempted) else 1


def run(args) -> int:
    from .nemo import LaunchError

    try:
        return launch(args)
    except (LaunchError, KeyError) as e:
        print(f"dualrpo launch: {e}", file=sys.stderr)
        return 2
