"""``dualrpo launch --executor slurm`` against a real (private, two-node) Slurm: nemo-run's
SlurmExecutor with a local tunnel, bare metal (no container), CPU nodes (no GRES).

* a 2-rank TP=2 job runs to the end: metrics.jsonl, checkpoints, logs under ``<out>/launch``; nemo-run
  reports SUCCEEDED and sacct COMPLETED 0:0;
* two nodes, one torchrun each, rendezvous on the first node of ``SLURM_JOB_NODELIST``;
* ``scancel --signal=TERM`` mid-run, then ``--resume auto``: the per-step losses equal the
  uninterrupted run's bitwise;
* bad requests fail before anything is queued, with the cause in the message.
"""
import glob
import json
import os
import shutil
import time

import pytest

from conftest import launch, launch_env

pytestmark = pytest.mark.slurm
STEPS = ["--steps", "4"]


def _records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _any_loss(out):
    """Whether a step's loss is on disk; the job may be mid-line, so a partial line counts as not yet."""
    try:
        with open(os.path.join(out, "metrics.jsonl")) as f:
            return any('"loss"' in line and line.endswith("\n") for line in f)
    except FileNotFoundError:
        return False


def _losses(out):
    return {r["step"]: r["loss"] for r in _records(out) if "loss" in r}


def _sacct(slurm, job_id):
    p = slurm.run("sacct", "-X", "-n", "-P", "-j", str(job_id), "-o", "State,ExitCode,NodeList")
    return p.stdout.strip().split("|")


def _job_ids(slurm, name="dualrpo-tiny_cpu"):
    p = slurm.run("sacct", "-X", "-n", "-P", "--name", name, "-o", "JobID", "-S", "now-1hour")
    return [int(j) for j in p.stdout.split()]


def _new_job(slurm, before, timeout=60):
    """The one job submitted since ``before``. sacct learns of a job from slurmdbd a moment after the
    submission returns (sooner on an idle machine), so it is polled rather than read once."""
    deadline = time.monotonic() + timeout
    while True:
        new = set(_job_ids(slurm)) - before
        if new or time.monotonic() > deadline:
            assert len(new) == 1, f"expected one new job, sacct shows {sorted(new)}"
            return new.pop()
        time.sleep(0.5)


def _settled_job_ids(slurm, timeout=60):
    """Job ids once nothing runs and accounting has caught up (the ids stay the same for 2 s)."""
    deadline, last, same_since = time.monotonic() + timeout, None, time.monotonic()
    while time.monotonic() < deadline:
        busy = slurm.run("squeue", "-h", check=False).stdout.strip()
        ids = set(_job_ids(slurm))
        if busy or ids != last:
            last, same_since = ids, time.monotonic()
        elif time.monotonic() - same_since >= 2:
            return ids
        time.sleep(0.5)
    return set(_job_ids(slurm))


@pytest.fixture(scope="module")
def baseline(slurm, slurm_data, tmp_path_factory):
    """The uninterrupted run every other check compares with: 1 node, 2 ranks, TP=2, 4 steps."""
    tmp = tmp_path_factory.mktemp("baseline")
    out = str(tmp / "run")
    before = set(_job_ids(slurm))
    p = launch(slurm, tmp, slurm_data, out, "--tp", "2", train=STEPS)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    job_id = _new_job(slurm, before)
    return out, p.stdout, job_id


def test_submit_trains_and_reports_state(slurm, baseline):
    out, stdout, job_id = baseline
    assert "launch: job tiny_cpu: SUCCEEDED" in stdout  # nemo-run's state, read through sacct
    assert _sacct(slurm, job_id)[:2] == ["COMPLETED", "0:0"]
    assert [r["step"] for r in _records(out)] == [0, 1, 2, 3, 4]
    assert os.path.isdir(os.path.join(out, "checkpoints", "step_00000004"))
    exp = glob.glob(os.path.join(out, "launch", "experiments", "dualrpo-tiny_cpu", "*", "tiny_cpu"))
    assert len(exp) == 1
    assert os.path.exists(exp[0] + "_sbatch.sh") and glob.glob(os.path.join(exp[0], "log-*.out"))


def test_two_nodes_one_torchrun_each(slurm, slurm_data, tmp_path, baseline):
    out = str(tmp_path / "run")
    before = set(_job_ids(slurm))
    p = launch(slurm, tmp_path, slurm_data, out, "--tp", "2", "--nodes", "2", "--gpus-per-node", "1",
               "--rdzv-port", str(_free_port()), train=["--steps", "2"])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    job_id = _new_job(slurm, before)
    state, code, nodes = _sacct(slurm, job_id)
    assert (state, code) == ("COMPLETED", "0:0") and nodes == "n[1-2]"
    # TP=2 across the two nodes computes what TP=2 on one node does: same losses, bitwise.
    assert _losses(out) == {s: v for s, v in _losses(baseline[0]).items() if s <= 2}


def _free_port():
    from cluster import free_ports

    return free_ports(1)[0]


def test_scancel_term_then_resume_matches_uninterrupted(slurm, slurm_data, tmp_path, baseline):
    out = str(tmp_path / "run")
    before = set(_job_ids(slurm))
    # No periodic checkpoint before the last step: a checkpoint of the step in flight can only come
    # from the trainer's SIGTERM handling.
    rare = ["--set", "checkpoint.every=100"]
    p = launch(slurm, tmp_path, slurm_data, out, "--tp", "2", "--detach", train=STEPS + rare)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    job_id = _new_job(slurm, before)
    deadline = time.monotonic() + 180
    while not _any_loss(out):
        assert time.monotonic() < deadline, f"job {job_id} wrote no step: {_sacct(slurm, job_id)}"
        time.sleep(0.05)
    slurm.run("scancel", "--signal=TERM", str(job_id))
    while _sacct(slurm, job_id)[0] in ("PENDING", "RUNNING", "COMPLETING", ""):
        assert time.monotonic() < deadline, f"job {job_id} did not end after SIGTERM"
        time.sleep(0.5)
    state, code, _ = _sacct(slurm, job_id)
    done = sorted(_losses(out))
    assert done and done[-1] < 4, f"the job finished before the signal landed ({state} {code}); nothing tested"
    print(f"job {job_id} after SIGTERM: {state} {code}, steps done {done}")
    assert state != "COMPLETED"
    ckpts = sorted(d for d in os.listdir(os.path.join(out, "checkpoints")) if d.startswith("step_"))
    assert ckpts == [f"step_{done[-1]:08d}"], f"the step in flight was not checkpointed at SIGTERM: {ckpts}"
    p = launch(slurm, tmp_path, slurm_data, out, "--tp", "2", train=STEPS + rare + ["--resume", "auto"])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    # Every step once, and each loss the uninterrupted run's to the bit.
    assert [r["step"] for r in _records(out) if r["step"] > 0] == [1, 2, 3, 4]
    assert _losses(out) == _losses(baseline[0])


@pytest.mark.parametrize("flags,needle", [
    (["--partition", "nosuch"], "invalid partition"),
    (["--nodes", "3", "--gpus-per-node", "1"], "node configuration is not available"),
    (["--nodes", "1", "--gpus-per-node", "1"], "do not split into tp=2"),
])
def test_bad_requests_fail_before_submission(slurm, slurm_data, tmp_path, flags, needle):
    before = _settled_job_ids(slurm)
    p = launch(slurm, tmp_path, slurm_data, str(tmp_path / "run"), "--tp", "2", *flags, train=["--steps", "1"])
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert needle in p.stderr.lower() or needle in p.stderr, p.stderr[-2000:]
    assert _settled_job_ids(slurm) == before  # nothing was queued


def test_sbatch_not_found(slurm, slurm_data, tmp_path):
    # A PATH with this interpreter and the basics but no Slurm clients, as on a machine outside the cluster.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    env = launch_env(slurm, tmp_path)
    env["PATH"] = f"{bin_dir}:/nonexistent"
    p = launch(slurm, tmp_path, slurm_data, str(tmp_path / "run"), "--tp", "2", train=["--steps", "1"], env=env)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert "`sbatch` not found" in p.stderr
    assert shutil.which("sbatch", path=env["PATH"]) is None
