"""``dualrpo train`` end to end as a user runs it (one process, TP=1): synthetic data -> 2 RL steps on
a random tiny model -> config.json (with reward_mode), metrics.jsonl with per-task keys, checkpoints;
then ``--resume auto --steps 3`` continues at step 3 instead of starting over."""
import json
import os

from helpers.cli import run_dualrpo


def _steps(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_train_cli_runs_and_resumes(synth_dir_cli, tmp_path):
    run_dir = str(tmp_path / "run")
    out = run_dualrpo("train", "--recipe", "tiny_cpu", "--data", synth_dir_cli, "--out", run_dir, "--steps", "2",
                      "--reward-mode", "grpo", "--no-progress", threads=2).stdout
    assert '"reward_mode": "grpo"' in out  # the resolved config is printed at start
    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["reward_mode"] == "grpo" and cfg["schedule"]["steps"] == 2
    records = _steps(run_dir)
    assert [r["step"] for r in records] == [0, 1, 2]  # 0: the held-out eval of the starting policy
    assert "eval/accuracy/all" in records[0] and "loss" not in records[0]
    assert any(k.startswith("accuracy/") and k != "accuracy/all" for k in records[1])
    assert "time/rollout" in records[1] and "loss" in records[1]
    assert os.path.isdir(os.path.join(run_dir, "checkpoints", "step_00000002"))

    out = run_dualrpo("train", "--recipe", "tiny_cpu", "--data", synth_dir_cli, "--out", run_dir, "--steps", "3",
                      "--reward-mode", "grpo", "--resume", "auto", "--no-progress", threads=2).stdout
    assert "train: 1 steps (last 3); accuracy/all " in out
    assert [r["step"] for r in _steps(run_dir)] == [0, 1, 2, 3]
