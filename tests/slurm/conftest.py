"""The private Slurm cluster the tests in this folder submit to (see ``cluster.py``).

One two-node cluster per session (two slurmd on this host: Debian's build allows it), stopped by the
PIDs it started, also when a test fails. Without the binaries every test here skips, naming what is
missing and how to install it. Jobs run one at a time: each test waits for its own job to end.
"""
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

from cluster import Cluster, ClusterError, missing_binaries  # noqa: E402

# The smallest job that still exercises everything: TP=2 over 2 ranks, 2 prompts x G=2, 8 new tokens.
SMALL = ["--reward-mode", "grpo", "--set", "rollout.group_size=2", "--set", "schedule.prompts_per_step=2",
         "--set", "rollout.sampling.max_new_tokens=8", "--set", "checkpoint.every=1"]


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


def launch_env(slurm, tmp_path, **extra):
    """Environment of a ``dualrpo launch`` that submits to ``slurm``: its own nemo-run home."""
    return dict(slurm.env, NEMORUN_HOME=str(tmp_path / "nemorun"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                TRANSFORMERS_OFFLINE="1", **extra)


def launch(slurm, tmp_path, data, out, *flags, train=(), env=None, timeout=240):
    argv = [sys.executable, "-m", "dualrpo_mcore", "launch", "--recipe", "tiny_cpu", "--data", data, "--out", out,
            "--executor", "slurm", "--account", "root", "--no-gpus", "--time", "00:10:00",
            "--env", "OMP_NUM_THREADS=1", *flags, "--", *SMALL, *train]
    return subprocess.run(argv, cwd=ROOT, env=env or launch_env(slurm, tmp_path), capture_output=True, text=True,
                          timeout=timeout)
