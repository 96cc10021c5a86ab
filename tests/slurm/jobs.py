"""What the Slurm tests share: submitting ``dualrpo launch --executor slurm`` to the private cluster
and reading back what the jobs left (metrics, sacct)."""
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NAME = "dualrpo-tiny_cpu"  # the job name nemo-run gives tiny_cpu jobs

# The smallest job that still exercises everything: TP=2 over 2 ranks, 2 prompts x G=2, 8 new tokens.
SMALL = ["--reward-mode", "grpo", "--set", "rollout.group_size=2", "--set", "schedule.prompts_per_step=2",
         "--set", "rollout.sampling.max_new_tokens=8", "--set", "checkpoint.every=1"]


def launch_env(slurm, tmp_path, **extra):
    """Environment of a ``dualrpo launch`` that submits to ``slurm``: its own nemo-run home."""
    return dict(slurm.env, NEMORUN_HOME=str(tmp_path / "nemorun"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                TRANSFORMERS_OFFLINE="1", **extra)


def launch_argv(data, out, *flags, train=()):
    return [sys.executable, "-m", "dualrpo_mcore", "launch", "--recipe", "tiny_cpu", "--data", data, "--out", out,
            "--executor", "slurm", "--account", "root", "--no-gpus", "--time", "00:10:00",
            "--env", "OMP_NUM_THREADS=1", *flags, "--", *SMALL, *train]


def launch(slurm, tmp_path, data, out, *flags, train=(), env=None, timeout=240):
    """Run ``dualrpo launch`` to its end (``--time`` given in ``flags`` overrides the 10 minutes)."""
    return subprocess.run(launch_argv(data, out, *flags, train=train), cwd=ROOT,
                          env=env or launch_env(slurm, tmp_path), capture_output=True, text=True, timeout=timeout)


def records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(out):
    return {r["step"]: r["loss"] for r in records(out) if "loss" in r}


def any_loss(out):
    """Whether a step's loss is on disk; the job may be mid-line, so a partial line counts as not yet."""
    try:
        with open(os.path.join(out, "metrics.jsonl")) as f:
            return any('"loss"' in line and line.endswith("\n") for line in f)
    except FileNotFoundError:
        return False


def checkpoints(out):
    return sorted(d for d in os.listdir(os.path.join(out, "checkpoints")) if d.startswith("step_"))


def sacct(slurm, job_id, every_attempt=False):
    """``[State, ExitCode, NodeList]`` of the job's latest attempt, or (``every_attempt``) one such list
    per attempt, oldest first (``sacct -D``: a requeued job keeps its id)."""
    p = slurm.run("sacct", "-X", "-n", "-P", *(["-D"] if every_attempt else []), "-j", str(job_id),
                  "-o", "State,ExitCode,NodeList")
    rows = [line.split("|") for line in p.stdout.strip().splitlines()]
    return rows if every_attempt else (rows[-1] if rows else [""])


def job_ids(slurm, name=NAME):
    p = slurm.run("sacct", "-X", "-n", "-P", "--name", name, "-o", "JobID", "-S", "now-1hour")
    return {int(j) for j in p.stdout.split()}


def new_job(slurm, before, timeout=60):
    """The one job submitted since ``before``. sacct learns of a job from slurmdbd a moment after the
    submission returns (sooner on an idle machine), so it is polled rather than read once."""
    deadline = time.monotonic() + timeout
    while True:
        new = job_ids(slurm) - before
        if new or time.monotonic() > deadline:
            assert len(new) == 1, f"expected one new job, sacct shows {sorted(new)}"
            return new.pop()
        time.sleep(0.5)


def settled_job_ids(slurm, timeout=60):
    """Job ids once nothing runs and accounting has caught up (the ids stay the same for 2 s)."""
    deadline, last, same_since = time.monotonic() + timeout, None, time.monotonic()
    while time.monotonic() < deadline:
        busy = slurm.run("squeue", "-h", check=False).stdout.strip()
        ids = job_ids(slurm)
        if busy or ids != last:
            last, same_since = ids, time.monotonic()
        elif time.monotonic() - same_since >= 2:
            return ids
        time.sleep(0.5)
    return job_ids(slurm)


def wait_for_loss(slurm, job_id, out, deadline):
    while not any_loss(out):
        assert time.monotonic() < deadline, f"job {job_id} wrote no step: {sacct(slurm, job_id)}"
        time.sleep(0.05)
