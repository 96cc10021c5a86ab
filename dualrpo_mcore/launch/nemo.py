"""``dualrpo train`` as a nemo-run task, and the executors that run it.

* :func:`train_task`: the task, a ``run.Script`` running ``python -m dualrpo_mcore train ...``;
  nemo-run's torchrun launcher wraps it (``torchrun --nnodes .. --nproc-per-node .. -m dualrpo_mcore``).
* :func:`local_executor`: ``run.LocalExecutor`` + torchrun on this machine (gloo on CPU, NCCL on GPUs).
* :func:`slurm_executor`: ``run.SlurmExecutor`` for multi-node H100 clusters, in a Pyxis container or
  bare metal (no ``--container``: the job runs this interpreter, so the package must be installed on a
  filesystem the nodes share): one torchrun per node, rendezvous (c10d) on the first node's address.
* :func:`check_slurm`: asks the cluster (``sbatch --test-only``) whether it can ever run the request, so
  an unknown partition or too many nodes fail before anything is submitted, in Slurm's own words.
* :func:`run_experiment`: one ``run.Experiment`` holding one or more jobs, run or dry-run (nemo-run
  prints the generated job scripts without submitting anything).

nemo-run is an optional extra: it is imported inside the functions that need it.
"""
from __future__ import annotations

import glob
import inspect
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

EXTRA_HINT = "pip install 'dualrpo-mcore[launch]'"
PACKAGERS = ("none", "git")
_TIME = re.compile(r"^(\d+-)?\d{1,3}:\d{2}(:\d{2})?$")  # Slurm --time: [D-]HH:MM[:SS]
_SIGNAL = re.compile(r"^(R:|B:|RB:|BR:)?[A-Z0-9]+(@\d+)?$")  # sbatch --signal
_MOUNT = re.compile(r"^[^:,]+:[^:,]+(:(ro|rw))?$")   # Pyxis --container-mounts: SRC:DST[:ro|rw]

# The NCCL / PyTorch environment of every multi-node job. Each line says why it is set.
NCCL_ENV: Dict[str, str] = {
    # Megatron's TP communication/computation overlap relies on kernels being issued in order
    # on one hardware queue; without this, overlapped all-gathers can be scheduled late.
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",
    # Free NCCL input buffers when the collective ends instead of when the caching allocator
    # next notices: lower peak memory with SGLang colocated on the same GPUs.
    "TORCH_NCCL_AVOID_RECORD_STREAMS": "1",
    # A failed or timed-out collective tears the job down instead of leaving ranks hung.
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    # InfiniBand is the inter-node transport; a longer IB timeout rides out fabric hiccups on
    # large jobs instead of failing the step (4.096 us * 2^22, about 17 s).
    "NCCL_IB_DISABLE": "0",
    "NCCL_IB_TIMEOUT": "22",
    # Warnings only: INFO floods the logs of a 32-GPU job.
    "NCCL_DEBUG": "WARN",
    "PYTHONUNBUFFERED": "1",
}


class LaunchError(ValueError):
    """A bad launch setting (the message names the flag or field) or a missing extra."""


def require_nemo_run():
    """The ``nemo_run`` module, or a :class:`LaunchError` naming the extra to install."""
    try:
        import nemo_run
    except ImportError as e:
        raise LaunchError(f"nemo-run is not installed ({e}); install the launch extra: {EXTRA_HINT}") from e
    return nemo_run


def recipe_parallel(recipe: str) -> Tuple[int, int]:
    """The ``(tp, pp)`` defaults of a recipe function's signature (no config is built, no file read)."""
    from dualrpo_mcore.trainer.recipes import RECIPES

    try:
        params = inspect.signature(RECIPES.get(recipe)).parameters
    except KeyError as e:
        raise LaunchError(f"--recipe: {e.args[0]}") from None
    return tuple(params[k].default if k in params and params[k].default is not inspect.Parameter.empty else 1
                 for k in ("tp", "pp"))


@dataclass
class TrainJob:
    """One ``dualrpo train`` invocation."""

    recipe: str
    """Recipe name in ``trainer.recipes.RECIPES``."""
    data: str
    """Data directory, as seen by the job (a container path on Slurm)."""
    out: str
    """Run directory (config.json, metrics.jsonl, checkpoints), as seen by the job."""
    init: Optional[str] = None
    """Initial policy (HF directory); None = the recipe's default (random init / preset)."""
    tp: Optional[int] = None
    """Tensor-parallel size; None = the recipe's default."""
    pp: Optional[int] = None
    """Pipeline-parallel size; None = the recipe's default."""
    extra_args: List[str] = field(default_factory=list)
    """Further ``dualrpo train`` flags (e.g. ``--steps 2 --reward-mode grpo``); they come last, so they win."""

    def __post_init__(self) -> None:
        for name in ("recipe", "data", "out"):
            if not getattr(self, name):
                raise LaunchError(f"--{name} must be given")
        self.extra_args = list(self.extra_args)
        given = [a for a in self.extra_args if a.split("=")[0] in ("--tp", "--pp")]
        if given:  # the world check below must see the layout the job will use
            raise LaunchError(f"{given[0]} after `--`: give --tp/--pp to the launcher instead")
        tp, pp = recipe_parallel(self.recipe)
        # `dualrpo train` defaults --tp/--pp to 1, so the recipe's own layout is passed explicitly.
        self.tp = tp if self.tp is None else self.tp
        self.pp = pp if self.pp is None else self.pp
        if self.tp < 1 or self.pp < 1:
            raise LaunchError(f"--tp/--pp must be >= 1 (got tp={self.tp}, pp={self.pp})")

    def train_args(self) -> List[str]:
        """Arguments after ``python -m dualrpo_mcore``."""
        args = ["train", "--recipe", self.recipe, "--data", self.data, "--out", self.out,
                "--tp", str(self.tp), "--pp", str(self.pp)]
        if self.init:
            args += ["--init", self.init]
        return args + ["--no-progress"] + self.extra_args  # a progress bar garbles batch logs

    def check_world(self, world: int, where: str) -> None:
        """The world must split into TP x PP x DP."""
        if world % (self.tp * self.pp):
            raise LaunchError(f"{where}: {world} processes do not split into tp={self.tp} x pp={self.pp} "
                              f"(x data-parallel); change --nodes/--gpus-per-node or --tp/--pp")


def train_task(job: TrainJob):
    """The nemo-run task: ``python -m dualrpo_mcore train ...`` (torchrun replaces ``python`` when launched)."""
    run = require_nemo_run()
    return run.Script(path="dualrpo_mcore", entrypoint="python", m=True, args=job.train_args())


def parse_env(items: Sequence[str], flag: str = "--env") -> Dict[str, str]:
    """``["K=V", ...]`` -> dict; a malformed item names the flag."""
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            raise LaunchError(f"{flag} {item!r}: expected NAME=VALUE")
        env[key] = value
    return env


@dataclass
class LocalOptions:
    """torchrun on this machine through ``run.LocalExecutor``."""

    nproc_per_node: int = 2
    """Processes torchrun starts (GPUs on a GPU box; gloo processes on CPU)."""
    env: Dict[str, str] = field(default_factory=dict)
    """Extra environment of the job."""

    def __post_init__(self) -> None:
        if self.nproc_per_node < 1:
            raise LaunchError(f"--nproc-per-node must be >= 1, got {self.nproc_per_node}")


def local_executor(opts: LocalOptions):
    run = require_nemo_run()
    # nemo-run resolves `torchrun` through PATH; put this interpreter's bin dir first so the job
    # uses the same environment (and torch) as the launcher even when the venv is not activated.
    env = {"PATH": os.path.dirname(sys.executable), **opts.env}
    return run.LocalExecutor(ntasks_per_node=opts.nproc_per_node, nodes=1, launcher="torchrun", env_vars=env)


@dataclass
class SlurmOptions:
    """A Slurm cluster of GPU nodes (H100: 8 per node), with Pyxis containers or bare metal."""

    account: str
    """``--account`` of the allocation."""
    container_image: Optional[str] = None
    """Container image with dualrpo-mcore installed (CUDA torch, TE, SGLang), e.g. an enroot .sqsh or registry
    tag; None = bare metal: the nodes run this interpreter (``sys.executable``) from a shared filesystem."""
    partition: Optional[str] = None
    """``--partition``; None = the cluster's default."""
    time: str = "04:00:00"
    """Wall-clock limit, ``[D-]HH:MM[:SS]``."""
    nodes: int = 1
    """Nodes of the job; one torchrun per node."""
    gpus_per_node: int = 8
    """GPUs per node; torchrun starts one process per GPU."""
    container_mounts: List[str] = field(default_factory=list)
    """``SRC:DST[:ro|rw]`` bind mounts (data, run dir, model, caches)."""
    job_dir: Optional[str] = None
    """Where sbatch scripts and logs go, on a filesystem the nodes share; None = the experiment dir."""
    ssh_host: Optional[str] = None
    """Submit over SSH to this login node (None: sbatch runs on this machine)."""
    ssh_user: Optional[str] = None
    """SSH user (with ``ssh_host``)."""
    ib_hca: Optional[str] = "mlx5"
    """``NCCL_IB_HCA``: InfiniBand adapters NCCL may use (prefix match; H100 nodes carry mlx5 ConnectX NICs); None = unset."""
    socket_ifname: Optional[str] = "^lo,docker"
    """``NCCL_SOCKET_IFNAME``: interfaces for NCCL's bootstrap sockets (default: anything but loopback/docker)."""
    env: Dict[str, str] = field(default_factory=dict)
    """Extra environment; overrides :data:`NCCL_ENV`."""
    exclusive: bool = True
    """Whole nodes: colocated rollout + training uses all GPU memory and host RAM."""
    packager: str = "none"
    """'none': run the package installed in the image; 'git': ship this checkout's HEAD as the job's code."""
    rdzv_port: int = 29500
    """torchrun c10d rendezvous port on the first node."""
    gpus: bool = True
    """Request ``--gpus-per-node`` GPUs from Slurm; False (CPU nodes, no GRES): ``gpus_per_node`` is only the
    number of processes torchrun starts per node, and NCCL settings are left out (gloo)."""
    signal: Optional[str] = None
    """``sbatch --signal``: e.g. ``TERM@120`` has Slurm send SIGTERM 120 s before the time limit, so the
    trainer can checkpoint before the SIGKILL; None = Slurm's default (SIGTERM only at the limit)."""
    requeue: bool = False
    """``sbatch --requeue``: a preempted or failed-node job goes back to the queue (run it with
    ``--resume auto`` so the requeued job continues from its last checkpoint)."""

    def __post_init__(self) -> None:
        if not self.account:
            raise LaunchError("--account is required for --executor slurm")
        if self.container_mounts and not self.container_image:
            raise LaunchError("--mount needs --container (bare-metal jobs see the nodes' filesystems as they are)")
        if self.signal and not _SIGNAL.match(self.signal):
            raise LaunchError(f"--signal {self.signal!r}: expected [B:]SIG[@SECONDS], e.g. TERM@120")
        if self.nodes < 1:
            raise LaunchError(f"--nodes must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 1:
            raise LaunchError(f"--gpus-per-node must be >= 1, got {self.gpus_per_node}")
        if not _TIME.match(self.time):
            raise LaunchError(f"--time {self.time!r}: expected [D-]HH:MM[:SS]")
        for m in self.container_mounts:
            if not _MOUNT.match(m):
                raise LaunchError(f"--mount {m!r}: expected SRC:DST or SRC:DST:ro|rw")
        if self.packager not in PACKAGERS:
            raise LaunchError(f"--packager {self.packager!r}: choose one of {PACKAGERS}")
        if self.ssh_host and not (self.ssh_user and self.job_dir):
            raise LaunchError("--ssh-host needs --ssh-user and --job-dir (a directory on the cluster)")
        if not 0 < self.rdzv_port < 65536:
            raise LaunchError(f"--rdzv-port must be a TCP port, got {self.rdzv_port}")

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def nccl_env(self) -> Dict[str, str]:
        if not self.gpus:
            return {"PYTHONUNBUFFERED": "1", **self.env}
        env = dict(NCCL_ENV)
        if self.ib_hca:
            env["NCCL_IB_HCA"] = self.ib_hca
        if self.socket_ifname:
            env["NCCL_SOCKET_IFNAME"] = self.socket_ifname
        env.update(self.env)
        return env


def slurm_executor(opts: SlurmOptions, exp_base_dir: str):
    """A ``run.SlurmExecutor``. Without ``opts.job_dir``, sbatch scripts and logs land in the experiment's
    own folder (``<exp_base_dir>/experiments/<title>/<id>/<job>``), beside nemo-run's metadata."""
    run = require_nemo_run()
    job_dir = opts.job_dir or os.path.join(exp_base_dir, "experiments")
    if opts.ssh_host:
        tunnel = run.SSHTunnel(host=opts.ssh_host, user=opts.ssh_user, job_dir=job_dir)
    else:
        tunnel = run.LocalTunnel(job_dir=job_dir)
    packager = run.GitArchivePackager() if opts.packager == "git" else run.Packager()
    env = opts.nccl_env()
    if not opts.container_image:
        # Bare metal: torchrun and python resolve through PATH on the node, so the launcher's own
        # environment (a venv on the shared filesystem) must come first there too.
        env = {"PATH": f"{os.path.dirname(sys.executable)}:{os.environ.get('PATH', '/usr/bin:/bin')}", **env}
    extra = {"requeue": True} if opts.requeue else None
    return run.SlurmExecutor(
        account=opts.account, partition=opts.partition, time=opts.time, nodes=opts.nodes,
        job_name_prefix="dualrpo-",
        # One task per GPU as the request; nemo-run's torchrun launcher turns it into one task per
        # node running `torchrun --nproc-per-node <gpus>` (rendezvous at the first node, c10d).
        ntasks_per_node=opts.gpus_per_node, gpus_per_node=opts.gpus_per_node if opts.gpus else None,
        exclusive=opts.exclusive or None, container_image=opts.container_image or None,
        container_mounts=list(opts.container_mounts), env_vars=env, signal=opts.signal,
        additional_parameters=extra,
        launcher=run.Torchrun(rdzv_backend="c10d", rdzv_port=opts.rdzv_port),
        tunnel=tunnel, packager=packager)


def check_slurm(opts: SlurmOptions, env: Optional[Dict[str, str]] = None) -> None:
    """Ask the cluster whether it could ever run this request (``sbatch --test-only``: nothing is queued).
    Raises :class:`LaunchError` with Slurm's reason: no ``sbatch`` here, an unknown partition or account,
    more nodes or GPUs than the partition has, a time limit above its maximum. Over SSH the check is
    left to the submission itself."""
    import shutil
    import subprocess

    if opts.ssh_host:
        return
    sbatch = shutil.which("sbatch", path=(env or os.environ).get("PATH"))
    if sbatch is None:
        raise LaunchError("--executor slurm: `sbatch` not found on PATH; run on a Slurm login node, or submit "
                          "through one with --ssh-host")
    argv = [sbatch, "--test-only", f"--nodes={opts.nodes}", "--ntasks-per-node=1", f"--time={opts.time}",
            f"--account={opts.account}", "--job-name=dualrpo-check"]
    argv += [f"--partition={opts.partition}"] if opts.partition else []
    argv += [f"--gpus-per-node={opts.gpus_per_node}"] if opts.gpus else []
    argv += ["--exclusive"] if opts.exclusive else []
    try:
        p = subprocess.run(argv + ["--wrap", "true"], capture_output=True, text=True, timeout=60, env=env)
    except subprocess.TimeoutExpired:
        raise LaunchError("--executor slurm: `sbatch --test-only` did not answer in 60 s; is slurmctld up?") from None
    if p.returncode != 0:
        why = " ".join((p.stderr or p.stdout).split()) or f"exit status {p.returncode}"
        raise LaunchError(f"--executor slurm: the cluster refuses {opts.nodes} node(s)"
                          f"{' in partition ' + repr(opts.partition) if opts.partition else ''}: {why}")


@dataclass
class LaunchResult:
    """What :func:`run_experiment` did: the experiment dir, per-job states, dry-run scripts."""

    experiment_dir: str
    states: Dict[str, str] = field(default_factory=dict)
    scripts: Dict[str, str] = field(default_factory=dict)
    logs: Dict[str, List[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        good = {"SUCCEEDED", "SUBMITTED", "RUNNING", "PENDING"}  # the last three: a detached launch
        return bool(self.scripts) or (bool(self.states) and all(s in good for s in self.states.values()))


def run_experiment(title: str, jobs: Sequence[Tuple[str, object, object]], base_dir: str, *,
                   dryrun: bool = False, detach: bool = False, tail_logs: bool = False) -> LaunchResult:
    """One ``run.Experiment`` named ``title`` under ``base_dir`` with ``(name, task, executor)`` jobs.

    ``dryrun``: nemo-run's dry run; the generated script of each job is returned (nothing is launched,
    the experiment's metadata dir is removed again). Otherwise the jobs run (in parallel) and, unless
    ``detach``, this waits for them to end."""
    run = require_nemo_run()
    names = [name for name, _, _ in jobs]
    if not names or len(set(names)) != len(names):
        raise LaunchError(f"experiment {title!r}: job names must be unique and non-empty, got {names}")
    os.makedirs(base_dir, exist_ok=True)
    with run.Experiment(title, base_dir=base_dir, log_level="WARN") as exp:
        for name, task, executor in jobs:
            exp.add(task, executor=executor, name=name, tail_logs=tail_logs)
        result = LaunchResult(experiment_dir=exp._exp_dir)
        if dryrun:
            exp.dryrun(log=False)
            for job in exp.jobs:
                result.scripts[job.id] = str(job._dryrun_info)
            return result
        exp.run(detach=detach, tail_logs=tail_logs)
    # Leaving the context is where nemo-run waits for the jobs (unless detached) and records their states.
    for job in exp.jobs:
        result.states[job.id] = getattr(job.state, "name", str(job.state))
        job_dir = getattr(job.executor, "job_dir", "") or ""
        logs = sorted(glob.glob(os.path.join(job_dir, "**", "*.log"), recursive=True))
        # torchx writes one combined (stdout + stderr, all ranks) log per replica: that one is the story.
        result.logs[job.id] = [p for p in logs if p.endswith("combined.log")] or logs
    return result
