"""Preemption and time limits on a real (private) Slurm, and the requeue status reaching Slurm.

The trainer stops on SIGTERM/SIGUSR1 after checkpointing the step in flight and exits 75; torchrun
turns that into 1, so rank 0 leaves ``<run dir>/preempted`` naming the step and the job attempt, and the
job script's EXIT trap (``launch.nemo.exit_lines``) restores 75 and, with ``--requeue``, requeues the job.

* the trap itself, in bash, with a fake ``scontrol`` (no cluster): which marker counts, the cap;
* ``scancel --signal=TERM`` mid-run with ``--requeue``: the attempt ends REQUEUED, the job runs again
  with ``--resume auto`` to COMPLETED 0:0, nemo-run reports SUCCEEDED, and every step's loss equals the
  uninterrupted run's bitwise;
* a time limit: ``--time 2 --signal USR1@45`` warns the job (Slurm checks limits every 30 s and sends
  the warning at the first check within 30 s of its time: 45 to 75 s after the start, well after the
  trainer's start-up, 15 to 40 s here), the step in flight is checkpointed, the job ends FAILED 75:0
  before its limit, and ``dualrpo launch`` says so and exits 75;
* SIGKILL of torchrun and the trainers (a dead node): nothing runs on the way out; a relaunch with ``--resume auto`` loses only the steps
  after the newest checkpoint and ends with the uninterrupted run's losses.
"""
import os
import subprocess
import time

import pytest

from dualrpo_mcore.launch import nemo
from dualrpo_mcore.trainer import preempt
from slurm.jobs import (ROOT, checkpoints, job_ids, launch, launch_argv, launch_env, losses, new_job, records,
                        sacct, wait_for_loss)

RARE = ["--set", "checkpoint.every=1000"]  # a checkpoint of the step in flight can only come from a signal


# ------------------------------------------------------------------ the job script's trap, no cluster
def _trap(tmp_path, rc, marker_attempt, restarts=None, requeue=True, max_requeues=2):
    """Run the EXIT trap after a command that exits ``rc``; returns (status, scontrol calls, output)."""
    run_dir, bin_dir = tmp_path / "run", tmp_path / "bin"
    run_dir.mkdir(parents=True)
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    if marker_attempt:
        (run_dir / preempt.MARKER).write_text(f"step=3\nsignal=SIGTERM\nattempt={marker_attempt}\ntime=0\n")
    script = nemo.exit_lines(str(run_dir), requeue=requeue, max_requeues=max_requeues) + f"\nexit {rc}\n"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="41")
    env.pop("SLURM_RESTART_COUNT", None)
    if restarts is not None:
        env["SLURM_RESTART_COUNT"] = str(restarts)
    p = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30)
    return p.returncode, calls.read_text().split("\n")[:-1] if calls.exists() else [], p.stdout


def test_trap_restores_75_and_requeues_for_this_attempt_only(tmp_path):
    rc, calls, out = _trap(tmp_path, 1, "41.0")
    assert (rc, calls) == (75, ["requeue 41"]) and "step=3" in out
    # A marker of the first attempt says nothing about the second (SLURM_RESTART_COUNT=1): its failure stays 1.
    assert _trap(tmp_path / "a", 1, "41.0", restarts=1)[:2] == (1, [])
    assert _trap(tmp_path / "b", 1, "41.1", restarts=1)[:2] == (75, ["requeue 41"])
    assert _trap(tmp_path / "c", 1, "7.0")[:2] == (1, [])        # another job's marker
    assert _trap(tmp_path / "d", 1, None)[:2] == (1, [])         # a plain failure
    assert _trap(tmp_path / "e", 0, "41.0")[:2] == (0, [])       # it finished after all
    assert _trap(tmp_path / "f", 1, "41.0", requeue=False)[:2] == (75, [])
    rc, calls, out = _trap(tmp_path / "g", 1, "41.2", restarts=2, max_requeues=2)
    assert (rc, calls) == (75, []) and "--max-requeues" in out


def test_marker_names_step_and_attempt(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "12")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    watch = preempt.Watch(str(tmp_path))
    try:
        err = watch.stopped(5, "SIGUSR1")
    finally:
        watch.close()
    assert isinstance(err, preempt.Preempted) and err.step == 5
    marker = preempt.read_marker(str(tmp_path))
    assert {k: marker[k] for k in ("step", "signal", "attempt")} == {"step": "5", "signal": "SIGUSR1",
                                                                      "attempt": "12.3"}
    assert [p for p in os.listdir(tmp_path) if p != preempt.MARKER] == []  # no temp left beside it
    monkeypatch.delenv("SLURM_JOB_ID")
    assert preempt.attempt() == "local"


def test_marker_that_cannot_be_written_still_stops(tmp_path, capsys):
    watch = preempt.Watch(str(tmp_path / "missing"))
    try:
        err = watch.stopped(2, "SIGTERM")
    finally:
        watch.close()
    assert err.step == 2 and "could not write the preemption marker" in capsys.readouterr().out


@pytest.mark.parametrize("train,expect", [
    ([], ["--resume", "auto"]),
    (["--resume", "auto"], ["--resume", "auto"]),
    (["--resume=auto"], ["--resume=auto"]),
])
def test_requeue_resumes_auto(train, expect):
    from dualrpo_mcore.launch.cli import resume_auto

    assert resume_auto(["--steps", "3"] + train) == ["--steps", "3"] + expect


def test_requeue_refuses_a_fixed_resume_and_batch_signals():
    from dualrpo_mcore.launch.cli import resume_auto

    with pytest.raises(nemo.LaunchError, match="--resume auto"):
        resume_auto(["--resume", "/runs/x/checkpoints/step_00000002"])
    with pytest.raises(nemo.LaunchError, match="B: signals only the batch shell"):
        nemo.SlurmOptions(account="a", signal="B:USR1@60")
    pytest.importorskip("nemo_run", reason="nemo-run is not installed (pip install 'dualrpo-mcore[launch]')")
    opts = nemo.SlurmOptions(account="a", container_image="img", container_mounts=["/lustre/runs:/runs"],
                             requeue=True)
    assert nemo.host_path("/runs/7b", opts) == "/lustre/runs/7b"
    with pytest.raises(nemo.LaunchError, match="not under any --mount"):
        nemo.slurm_executor(opts, "/tmp/unused", run_dir="/scratch/7b")


def test_agent_env_handles_usr1_and_waits_for_the_checkpoint():
    env = nemo.agent_env(nemo.SlurmOptions(account="a", signal="USR1@90"))
    assert "SIGUSR1" in env["PET_SIGNALS_TO_HANDLE"].split(",") and env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "90"
    assert nemo.agent_env(nemo.SlurmOptions(account="a", signal="R:TERM"))["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "60"
    assert "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" not in nemo.agent_env(nemo.SlurmOptions(account="a"))


# ------------------------------------------------------------------------------ on the real cluster
def _wait_end(slurm, job_id, deadline, what):
    while sacct(slurm, job_id)[0] in ("PENDING", "RUNNING", "COMPLETING", "REQUEUED", ""):
        assert time.monotonic() < deadline, f"job {job_id} did not end {what}: {sacct(slurm, job_id, True)}"
        time.sleep(0.5)


@pytest.mark.slurm
def test_term_with_requeue_continues_and_matches_uninterrupted(slurm, slurm_data, tmp_path, baseline):
    out = str(tmp_path / "run")
    before = job_ids(slurm)
    # Not detached: nemo-run follows the job through its requeue (REQUEUED counts as pending).
    proc = subprocess.Popen(launch_argv(slurm_data, out, "--tp", "2", "--requeue", train=["--steps", "4"] + RARE),
                            cwd=ROOT, env=launch_env(slurm, tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        job_id = new_job(slurm, before)
        deadline = time.monotonic() + 180
        wait_for_loss(slurm, job_id, out, deadline)
        slurm.run("scancel", "--signal=TERM", str(job_id))
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert "launch: job tiny_cpu: SUCCEEDED" in stdout
    attempts = sacct(slurm, job_id, every_attempt=True)
    print(f"job {job_id}, every attempt (State, ExitCode, NodeList): {attempts}")
    assert [a[:2] for a in attempts] == [["REQUEUED", "0:0"], ["COMPLETED", "0:0"]], attempts
    marker = preempt.read_marker(out)
    stopped = int(marker["step"])
    assert marker["attempt"] == f"{job_id}.0" and marker["signal"] == "SIGTERM" and 1 <= stopped < 4, marker
    # The signal's checkpoint, then the last step's (no periodic one in between).
    assert checkpoints(out) == [f"step_{stopped:08d}", "step_00000004"]
    # Every step once, and each loss the uninterrupted run's to the bit.
    assert [r["step"] for r in records(out) if r["step"] > 0] == [1, 2, 3, 4]
    assert losses(out) == losses(baseline[0])


@pytest.mark.slurm
def test_time_limit_warning_checkpoints_and_exits_75(slurm, slurm_data, tmp_path):
    out = str(tmp_path / "run")
    before = job_ids(slurm)
    t0 = time.monotonic()
    # More steps than fit in 2 minutes: only the warning can end the run before the limit.
    p = launch(slurm, tmp_path, slurm_data, out, "--tp", "2", "--time", "00:02:00", "--signal", "USR1@45",
               train=["--steps", "100000"] + RARE, timeout=300)
    job_id = new_job(slurm, before)
    state, code, _ = sacct(slurm, job_id)
    print(f"job {job_id} after the time-limit warning: {state} {code} in {time.monotonic() - t0:.0f} s")
    assert p.returncode == preempt.REQUEUE_EXIT, p.stdout[-3000:] + p.stderr[-3000:]
    assert (state, code) == ("FAILED", f"{preempt.REQUEUE_EXIT}:0")  # not TIMEOUT: it ended before the limit
    assert "exit status 75:0: stopped on a signal after a checkpoint" in p.stdout
    marker = preempt.read_marker(out)
    assert marker["signal"] == "SIGUSR1" and marker["attempt"] == f"{job_id}.0", marker
    done = sorted(s for s in losses(out))
    assert done[-1] == int(marker["step"]) and checkpoints(out) == [f"step_{done[-1]:08d}"]
    elapsed = slurm.run("sacct", "-X", "-n", "-P", "-j", str(job_id), "-o", "ElapsedRaw").stdout.split()
    assert int(elapsed[-1]) < 120, f"the job ran {elapsed} s: into its 2-minute limit"


def _kill_trainers(out):
    """SIGKILL every process whose command line trains into ``out`` (torchrun and its workers, not the
    ``dualrpo launch`` that submitted them); returns their pids."""
    import signal

    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "train" in argv and "launch" not in argv and out in argv:
            pids.append(int(pid))
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


@pytest.mark.slurm
def test_hard_kill_loses_only_the_steps_after_the_last_checkpoint(slurm, slurm_data, tmp_path, baseline):
    """SIGKILL of torchrun and the trainers: no handler runs, no marker, the job FAILED (not 75). Every step recorded up to
    then has a record, a step is checkpointed only after its record (checkpoint.every=1 here), and a
    second launch with ``--resume auto`` redoes only what came after the newest checkpoint: the steps
    end with one record each and the uninterrupted run's losses, bitwise."""
    out = str(tmp_path / "run")
    before = job_ids(slurm)
    proc = subprocess.Popen(launch_argv(slurm_data, out, "--tp", "2", train=["--steps", "4"]), cwd=ROOT,
                            env=launch_env(slurm, tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        job_id = new_job(slurm, before)
        wait_for_loss(slurm, job_id, out, time.monotonic() + 180)
        # SIGKILL, with no grace, to torchrun and the trainers (the cluster's nodes are this machine): the way
        # a node dies or the OOM killer strikes. (`scancel -s KILL` of the job lets slurmstepd send SIGTERM
        # first, and the trainers then checkpoint: that is the preemption path, tested above.)
        killed = _kill_trainers(out)
        assert killed, "found no trainer process of the job to kill"
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    state, code, _ = sacct(slurm, job_id)
    assert state == "FAILED" and code != f"{preempt.REQUEUE_EXIT}:0", (state, code)  # a failure, not a requeue
    assert preempt.read_marker(out) is None  # nothing ran on the way out
    recorded = sorted(losses(out))
    # A save cut short stays a step_N.tmp directory, which is never loaded.
    kept = [int(c[len("step_"):]) for c in checkpoints(out) if not c.endswith(".tmp")]
    assert max(kept, default=0) in (recorded[-1], recorded[-1] - 1), (recorded, kept)  # record, then checkpoint
    p = launch(slurm, tmp_path, slurm_data, out, "--tp", "2", train=["--steps", "4", "--resume", "auto"])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert [r["step"] for r in records(out) if r["step"] > 0] == [1, 2, 3, 4]
    assert losses(out) == losses(baseline[0])
