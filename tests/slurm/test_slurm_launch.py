"""``dualrpo launch --executor slurm`` against a real (private, two-node) Slurm: nemo-run's
SlurmExecutor with a local tunnel, bare metal (no container), CPU nodes (no GRES).

* a 2-rank TP=2 job runs to the end: metrics.jsonl, checkpoints, logs under ``<out>/launch``; nemo-run
  reports SUCCEEDED and sacct COMPLETED 0:0;
* two nodes, one torchrun each, rendezvous on the first node of ``SLURM_JOB_NODELIST``;
* (``test_slurm_preempt.py``: signals, the requeue status, requeued jobs);
* bad requests fail before anything is queued, with the cause in the message.
"""
import glob
import os
import shutil

import pytest

from slurm.cluster import free_ports
from slurm.jobs import job_ids, launch, launch_env, losses, new_job, records, sacct, settled_job_ids

pytestmark = pytest.mark.slurm


def test_submit_trains_and_reports_state(slurm, baseline):
    out, stdout, job_id = baseline
    assert "launch: job tiny_cpu: SUCCEEDED" in stdout  # nemo-run's state, read through sacct
    assert sacct(slurm, job_id)[:2] == ["COMPLETED", "0:0"]
    assert [r["step"] for r in records(out)] == [0, 1, 2, 3, 4]
    assert os.path.isdir(os.path.join(out, "checkpoints", "step_00000004"))
    exp = glob.glob(os.path.join(out, "launch", "experiments", "dualrpo-tiny_cpu", "*", "tiny_cpu"))
    assert len(exp) == 1
    assert os.path.exists(exp[0] + "_sbatch.sh") and glob.glob(os.path.join(exp[0], "log-*.out"))


def test_two_nodes_one_torchrun_each(slurm, slurm_data, tmp_path, baseline):
    out = str(tmp_path / "run")
    before = job_ids(slurm)
    p = launch(slurm, tmp_path, slurm_data, out, "--tp", "2", "--nodes", "2", "--gpus-per-node", "1",
               "--rdzv-port", str(free_ports(1)[0]), train=["--steps", "2"])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    job_id = new_job(slurm, before)
    state, code, nodes = sacct(slurm, job_id)
    assert (state, code) == ("COMPLETED", "0:0") and nodes == "n[1-2]"
    # TP=2 across the two nodes computes what TP=2 on one node does: same losses, bitwise.
    assert losses(out) == {s: v for s, v in losses(baseline[0]).items() if s <= 2}


@pytest.mark.parametrize("flags,needle", [
    (["--partition", "nosuch"], "invalid partition"),
    (["--nodes", "3", "--gpus-per-node", "1"], "node configuration is not available"),
    (["--nodes", "1", "--gpus-per-node", "1"], "do not split into tp=2"),
])
def test_bad_requests_fail_before_submission(slurm, slurm_data, tmp_path, flags, needle):
    before = settled_job_ids(slurm)
    p = launch(slurm, tmp_path, slurm_data, str(tmp_path / "run"), "--tp", "2", *flags, train=["--steps", "1"])
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert needle in p.stderr.lower() or needle in p.stderr, p.stderr[-2000:]
    assert settled_job_ids(slurm) == before  # nothing was queued


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
