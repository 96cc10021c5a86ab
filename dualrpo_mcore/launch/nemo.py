"""``dualrpo train`` as a nemo-run task, and the executors that run it.

:func:`train_task` is the task; :func:`local_executor` runs it under torchrun on this machine,
:func:`slurm_executor` on a Slurm cluster (one torchrun per node, c10d rendezvous on the first node),
in a Pyxis container or bare metal (no ``--container``: the job runs this interpreter, so the package
must be installed on a filesystem the nodes share); :func:`check_slurm` asks the cluster first, so a bad
request fails before anything is submitted; :func:`run_experiment` runs or dry-runs the jobs.

nemo-run is an optional extra: it is imported inside the functions that need it.
"""
from __future__ import annotations

import glob
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

EXTRA_HINT = "pip install 'dualrpo-mcore[launch]'"
PACKAGERS = ("none", "git")
OK_STATES = ("SUCCEEDED", "SUBMITTED", "RUNNING", "PENDING")  # the last three: a detached launch
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
    """The ``(tp, pp)`` of the layout a recipe is registered with (no config is built, no file read)."""
    from dualrpo_mcore.trainer.recipes import recipe_layout

    try:
        layout = recipe_layout(recipe)
    except KeyError as e:
        raise LaunchError(f"--recipe: {e.args[0]}") from None
    return layout.tp, layout.pp


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
    """``sbatch --requeue`` (Slurm may requeue the job on a node failure or a preemption), and the job
    script requeues itself (``scontrol requeue``) when the trainer stopped on a signal after a checkpoint;
    the train arguments must then resume with ``--resume auto``."""
    max_requeues: int = 10
    """With ``requeue``: the script requeues at most this many times (``SLURM_RESTART_COUNT``), so a time
    limit too short for even one step cannot cycle forever."""

    def __post_init__(self) -> None:
        if not self.account:
            raise LaunchError("--account is required for --executor slurm")
        if self.container_mounts and not self.container_image:
            raise LaunchError("--mount needs --container (bare-metal jobs see the nodes' filesystems as they are)")
        if self.signal and not _SIGNAL.match(self.signal):
            raise LaunchError(f"--signal {self.signal!r}: expected [R:]SIG[@SECONDS], e.g. TERM@120")
        if self.signal and self.signal.split(":")[0] in ("B", "RB", "BR"):
            # B: signals the batch shell, which is waiting on srun in the foreground: bash runs a trap
            # only after srun returns, so it could not pass the warning on to the trainer in time.
            raise LaunchError(f"--signal {self.signal!r}: B: signals only the batch shell, which cannot pass it on "
                              f"to the trainer while srun runs; use {self.signal.split(':', 1)[1]} (all job steps)")
        if self.max_requeues < 0:
            raise LaunchError(f"--max-requeues must be >= 0, got {self.max_requeues}")
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


def slurm_executor(opts: SlurmOptions, exp_base_dir: str, run_dir: Optional[str] = None):
    """A ``run.SlurmExecutor``. Without ``opts.job_dir``, sbatch scripts and logs land in the experiment's
    own folder (``<exp_base_dir>/experiments/<title>/<id>/<job>``), beside nemo-run's metadata.
    ``run_dir``: the job's ``--out`` as the job sees it; with it the job script ends with status 75 (and
    requeues itself with ``opts.requeue``) when the trainer stopped on a signal after a checkpoint
    (:func:`exit_lines`); without it a preempted job ends as failed (1)."""
    run = require_nemo_run()
    job_dir = opts.job_dir or os.path.join(exp_base_dir, "experiments")
    tunnel = (run.SSHTunnel(host=opts.ssh_host, user=opts.ssh_user, job_dir=job_dir) if opts.ssh_host
              else run.LocalTunnel(job_dir=job_dir))
    packager = run.GitArchivePackager() if opts.packager == "git" else run.Packager()
    env = {**agent_env(opts), **opts.nccl_env()}  # the latter ends with opts.env: the user's word wins
    if not opts.container_image:
        # Bare metal: torchrun and python resolve through PATH on the node, so the launcher's own
        # environment (a venv on the shared filesystem) must come first there too.
        env = {"PATH": f"{os.path.dirname(sys.executable)}:{os.environ.get('PATH', '/usr/bin:/bin')}", **env}
    extra = {"requeue": True} if opts.requeue else None
    setup = None
    if run_dir is not None:
        where = host_path(run_dir, opts)
        if where is None and opts.requeue:
            raise LaunchError(f"--requeue: the run dir {run_dir!r} is not under any --mount destination, so the job "
                              f"script cannot read the trainer's preemption marker (nor would the checkpoints "
                              f"outlive the container); mount a shared directory that holds --out")
        if where is not None:
            setup = exit_lines(where, requeue=opts.requeue, max_requeues=opts.max_requeues)
    return run.SlurmExecutor(
        account=opts.account, partition=opts.partition, time=opts.time, nodes=opts.nodes,
        job_name_prefix="dualrpo-",
        # One task per GPU as the request; nemo-run's torchrun launcher turns it into one task per
        # node running `torchrun --nproc-per-node <gpus>` (rendezvous at the first node, c10d).
        ntasks_per_node=opts.gpus_per_node, gpus_per_node=opts.gpus_per_node if opts.gpus else None,
        exclusive=opts.exclusive or None, container_image=opts.container_image or None,
        container_mounts=list(opts.container_mounts), env_vars=env, signal=opts.signal,
        additional_parameters=extra, setup_lines=setup,
        launcher=run.Torchrun(rdzv_backend="c10d", rdzv_port=opts.rdzv_port),
        tunnel=tunnel, packager=packager)


def agent_env(opts: SlurmOptions) -> Dict[str, str]:
    """Environment for torchrun's elastic agent, which Slurm signals along with the trainers (why it must
    handle USR1, and its shutdown timeout: docs/slurm.md, step 2). torch 2.13's torchrun reads both
    variables (read in its source); a torchrun without them ignores them, and there only TERM reaches the
    trainers safely."""
    env = {"PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"}
    if opts.signal:  # sbatch's lead time is 60 s when --signal names none
        env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = opts.signal.rpartition("@")[2] if "@" in opts.signal else "60"
    return env


def exit_lines(run_dir: str, requeue: bool = False, max_requeues: int = 10) -> str:
    """Bash for the job script (nemo-run's ``setup_lines``): an EXIT trap that gives the job status 75
    when the trainer stopped on a signal after a checkpoint, and with ``requeue`` puts the job back in the
    queue (the marker it reads and why: docs/slurm.md, steps 4 and 6). Why a trap: the script nemo-run
    generates ends with ``exit $exitcode`` after srun; an EXIT trap is the one place that runs after that
    and may change the status. ``run_dir`` as the node sees it."""
    from dualrpo_mcore.trainer.preempt import MARKER, REQUEUE_EXIT

    marker = shlex.quote(os.path.join(run_dir, MARKER))
    again = ""
    if requeue:
        again = (f'\n        if [ "${{SLURM_RESTART_COUNT:-0}}" -lt {int(max_requeues)} ]; then'
                 '\n            scontrol requeue "$SLURM_JOB_ID" && echo "dualrpo: job $SLURM_JOB_ID requeued" ||'
                 '\n                echo "dualrpo: scontrol requeue $SLURM_JOB_ID failed; resubmit with --resume auto"'
                 '\n        else'
                 f'\n            echo "dualrpo: not requeued: {int(max_requeues)} requeues done (--max-requeues)"'
                 '\n        fi')
    return (f'\n# dualrpo: status {REQUEUE_EXIT} = stopped on a signal after a checkpoint (docs/slurm.md)'
            '\ndualrpo_on_exit() {'
            '\n    local rc=$? attempt="$SLURM_JOB_ID.${SLURM_RESTART_COUNT:-0}"'
            '\n    set +e'
            f'\n    if [ "$rc" -ne 0 ] && grep -qxF "attempt=$attempt" {marker} 2>/dev/null; then'
            f'\n        echo "dualrpo: attempt $attempt stopped after a checkpoint'
            f' ($(grep -x \'step=[0-9]*\' {marker})): exit {REQUEUE_EXIT}"{again}'
            f'\n        exit {REQUEUE_EXIT}'
            '\n    fi'
            '\n    exit "$rc"'
            '\n}'
            '\ntrap dualrpo_on_exit EXIT')


def host_path(path: str, opts: SlurmOptions) -> Optional[str]:
    """Where the job script (on the node, outside any container) finds ``path`` as the job sees it: the
    same path on bare metal, else through the ``--mount`` whose destination holds it; None if no mount does
    (the path then lives inside the container, out of the script's reach)."""
    if not opts.container_image:
        return path
    for mount in opts.container_mounts:
        src, dst = mount.split(":")[:2]
        if path == dst or path.startswith(dst.rstrip("/") + "/"):
            return src.rstrip("/") + path[len(dst.rstrip("/")):]
    return None


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
    exit_codes: Dict[str, str] = field(default_factory=dict)
    """Slurm's ``ExitCode`` (``status:signal``) of each job that failed; nemo-run's state alone says FAILED."""

    @property
    def ok(self) -> bool:
        return bool(self.scripts) or (bool(self.states) and all(s in OK_STATES for s in self.states.values()))

    @property
    def preempted(self) -> List[str]:
        """Jobs that ended with the requeue status: stopped on a signal after a checkpoint."""
        from dualrpo_mcore.trainer.preempt import REQUEUE_EXIT

        return [name for name, code in self.exit_codes.items() if code.split(":")[0] == str(REQUEUE_EXIT)]


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
        if result.states[job.id] == "FAILED" and type(job.executor).__name__ == "SlurmExecutor":
            result.exit_codes[job.id] = slurm_exit_code(job)
    return result


def slurm_exit_code(job) -> str:
    """``sacct``'s ExitCode of a finished nemo-run Slurm job (its handle ends with the job id), read
    through the job's own tunnel; '' when Slurm does not say."""
    job_id = str(getattr(job, "handle", "")).rstrip("/").rsplit("/", 1)[-1]
    if not job_id.isdigit():
        return ""
    try:
        out = job.executor.tunnel.run(f"sacct -X -n -P -j {job_id} -o ExitCode", warn=True).stdout
    except Exception:  # noqa: BLE001 - the state is already known; the code only refines the report
        return ""
    codes = out.split()
    return codes[-1] if codes else ""
