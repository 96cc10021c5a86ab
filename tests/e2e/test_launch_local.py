"""``dualrpo launch`` end to end on this machine: the tiny recipe through nemo-run's LocalExecutor with
torchrun (2 CPU processes, TP=2, 2 steps on the smallest synthetic set); the job must succeed and
write every step to metrics.jsonl, with its logs in the nemo-run experiment under the run dir."""
import glob
import json
import os

import pytest

pytest.importorskip("nemo_run", reason="nemo-run is not installed (pip install 'dualrpo-mcore[launch]')")

from helpers.cli import run_dualrpo  # noqa: E402


# The same cheap data as the `dualrpo train` e2e test: one sample per task, random tiny policy.
def test_launch_local_torchrun_runs_to_completion(synth_dir_cli, tmp_path):
    run_dir = str(tmp_path / "run")
    out = run_dualrpo("launch", "--recipe", "tiny_cpu", "--data", synth_dir_cli, "--out", run_dir, "--executor",
                      "local", "--nproc-per-node", "2", "--tp", "2", "--env", "OMP_NUM_THREADS=1",
                      "--", "--steps", "2", "--reward-mode", "grpo", timeout=300, threads=2).stdout
    assert "launch: job tiny_cpu: SUCCEEDED" in out
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [0, 1, 2]  # 0: the held-out eval before training
    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["actor"]["parallel"]["tp"] == 2 and cfg["reward_mode"] == "grpo"
    # nemo-run kept the experiment and one log per torchrun rank under <run>/launch
    exp = glob.glob(os.path.join(run_dir, "launch", "experiments", "dualrpo-tiny_cpu", "*"))
    assert len(exp) == 1
    ranks = glob.glob(os.path.join(exp[0], "**", "attempt_0", "*", "stdout.log"), recursive=True)
    assert len(ranks) == 2
