"""The private Slurm cluster the tests in this folder submit to (see ``cluster.py``).

One two-node cluster per session (two slurmd on this host: Debian's build allows it), stopped by the
PIDs it started, also when a test fails. Without the binaries every test that needs it skips, naming
what is missing and how to install it. Jobs run one at a time: each test waits for its own job to end.
"""
import subprocess
import sys

import pytest

from slurm.cluster import Cluster, ClusterError, missing_binaries
from slurm.jobs import ROOT, job_ids, launch, new_job


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: submits jobs to the private Slurm cluster (one at a time)")


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    missing = missing_binaries()
    if missing:
        pytest.skip(f"Slurm/munge/MariaDB binaries not found ({', '.join(missing)}); "
                    f"install them with `bash scripts/dev_slurm.sh`")
    pytest.importorskip("nemo_run", reason="nemo-run is not installed (pip install 'dualrpo-mcore[launch]')")
    # A short root: Slurm and MariaDB sockets live under it, and unix socket paths are capped at 108 bytes.
    root = str(tmp_path_factory.mktemp("slurm", numbered=True))
    cluster = Cluster(root, nodes=2)
    try:
        cluster.start(timeout=60)
    except ClusterError as e:
        pytest.fail(f"the private Slurm cluster did not start: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def slurm_data(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("slurm_synth"))
    subprocess.run([sys.executable, "-m", "dualrpo_mcore", "data", "synth", "--out", out, "--num-per-task", "1",
                    "--heldout-per-task", "1"], cwd=ROOT, check=True, capture_output=True, timeout=120)
    return out


@pytest.fixture(scope="session")
def baseline(slurm, slurm_data, tmp_path_factory):
    """The uninterrupted run every other check compares with: 1 node, 2 ranks, TP=2, 4 steps.
    Returns ``(run dir, launch stdout, job id)``."""
    tmp = tmp_path_factory.mktemp("baseline")
    out = str(tmp / "run")
    before = job_ids(slurm)
    p = launch(slurm, tmp, slurm_data, out, "--tp", "2", train=["--steps", "4"])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out, p.stdout, new_job(slurm, before)
