"""``scripts/gpu_check.sh --dry-run``: the prepared GPU check is checked on the CPU, so that the few
minutes of device time it gets are not spent on a flag that no parser accepts."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dualrpo_mcore.bench import gpu_check

ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_plans_every_stage_within_budget_and_writes_the_record(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(out),
                           "--work", str(tmp_path / "work")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["dry_run"] is True and doc["commit"] and doc["versions"]["torch"]
    assert set(doc["stages"]) == {"tests-gpu", "kernel", "fused-head", "train-bf16", "train-fp8", "sglang-rl"}
    for name, rec in doc["stages"].items():
        assert rec["status"] == "parsed", (name, rec)
    assert doc["planned_s"] + doc["setup_s"] <= doc["budget_s"] == 480
    # No GPU here: every stage says what it would skip and why.
    assert all(any("cuda" in r for r in rec["would_skip"]) for rec in doc["stages"].values())
    # The CPU prefix of the SGLang stage really ran: data and the exported warm start exist.
    assert (tmp_path / "work" / "data" / "train.parquet").exists()
    assert (tmp_path / "work" / "sft" / "config.json").exists()


def test_dry_run_reports_a_command_that_would_fail_on_the_device(tmp_path, monkeypatch):
    real = gpu_check.plan

    def broken(work, have):
        stages = [s for s in real(work, have) if s.name in ("train-bf16", "sglang-rl")]
        stages[0].commands[0] = stages[0].commands[0][:-2] + ["--no-such-flag"]
        step = stages[1].commands[-1]
        step[step.index("rollout.engine=sglang")] = "rollout.no_such_field=1"
        return stages

    monkeypatch.setattr(gpu_check, "plan", broken)
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--dry-run", "--out", str(out), "--work", str(tmp_path / "w")]) == 1
    stages = json.loads(out.read_text())["stages"]
    assert stages["train-bf16"]["status"] == "broken"
    assert stages["sglang-rl"]["status"] == "broken"
    assert any("no_such_field" in p for p in stages["sglang-rl"]["problems"]), stages["sglang-rl"]


@pytest.mark.parametrize("setup_s", [95, 200])
def test_the_plan_is_refused_when_set_up_and_stages_exceed_the_budget(tmp_path, monkeypatch, setup_s):
    monkeypatch.setattr(gpu_check, "plan", lambda work, have: [])
    out = tmp_path / "g.json"
    rc = gpu_check.main(["--dry-run", "--out", str(out), "--setup-s", str(setup_s), "--budget-s", "150"])
    doc = json.loads(out.read_text())
    assert (rc, "plan_problem" in doc) == ((0, False) if setup_s <= 150 else (1, True))
