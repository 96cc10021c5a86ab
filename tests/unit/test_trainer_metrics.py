"""Metrics: per-task means, phase timing, JSONL (nulls for non-finite, truncation on resume), TB, bar."""
import json
import math
import os

import numpy as np
import pytest
import torch

from dualrpo_mcore.trainer.metrics import (MetricsLogger, PhaseTimer, per_task_means, read_jsonl, to_float,
                                           truncate_jsonl)


def test_per_task_means_by_hand():
    tasks = ["math", "ocr", "math", "ocr", "count"]
    accuracy = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    length = np.array([10, 20, 30, 40, 50])
    out = per_task_means(tasks, accuracy=accuracy, length=length)
    assert out["accuracy/math"] == 0.5 and out["accuracy/ocr"] == 0.5 and out["accuracy/count"] == 1.0
    assert out["accuracy/all"] == pytest.approx(0.6)
    assert out["length/math"] == 20.0 and out["length/all"] == 30.0
    assert out["count/math"] == 2.0 and out["count/count"] == 1.0
    assert not any(k.startswith("nonfinite") for k in out)


def test_per_task_means_skip_nonfinite_and_check_length():
    out = per_task_means(["a", "a", "b"], self_certainty=[1.0, float("nan"), float("inf")])
    assert out["self_certainty/a"] == 1.0 and math.isnan(out["self_certainty/b"])
    assert out["self_certainty/all"] == 1.0 and out["nonfinite/self_certainty"] == 2.0
    with pytest.raises(ValueError, match="'accuracy' has 2 values for 3"):
        per_task_means(["a", "a", "b"], accuracy=[1, 0])


def test_phase_timer_accumulates_and_resets():
    t = [0.0]
    timer = PhaseTimer(clock=lambda: t[0])
    with timer("rollout"):
        t[0] += 2.0
    for _ in range(2):
        with timer("update"):
            t[0] += 0.5
    with pytest.raises(RuntimeError):
        with timer("verify"):
            t[0] += 1.0
            raise RuntimeError("boom")  # an exception still records the time spent
    assert timer.pop() == {"time/rollout": 2.0, "time/update": 1.0, "time/verify": 1.0, "time/step": 4.0}
    assert timer.pop() == {"time/step": 0.0}


def test_to_float_nonfinite_is_none():
    assert to_float(torch.tensor(2.5)) == 2.5
    assert to_float(float("nan")) is None and to_float(np.float32("-inf")) is None


def _log_steps(run, steps, resume_step=None, tb=False):
    with MetricsLogger(str(run), total_steps=10, resume_step=resume_step, tensorboard=tb, progress=False,
                       enabled=True) as log:
        for s in steps:
            log.log(s, {"accuracy/all": s / 10, "kl": float("nan") if s == 2 else 0.1, "task": "x"})


def test_jsonl_one_line_per_step_with_null(tmp_path):
    _log_steps(tmp_path, [1, 2, 3])
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    recs = [json.loads(l) for l in lines]  # strict JSON: no NaN tokens
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert recs[1]["kl"] is None and recs[0]["kl"] == 0.1 and recs[2]["accuracy/all"] == 0.3
    assert "NaN" not in (tmp_path / "metrics.jsonl").read_text()


def test_resume_truncates_future_steps(tmp_path):
    _log_steps(tmp_path, [1, 2, 3, 4, 5])
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "accuracy/al')  # torn by a crash
    _log_steps(tmp_path, [4, 5, 6], resume_step=3)
    steps = [r["step"] for r in read_jsonl(str(tmp_path / "metrics.jsonl"))]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_truncate_missing_file_and_fresh_run_moves_old(tmp_path):
    assert truncate_jsonl(str(tmp_path / "none.jsonl"), 3) == 0
    _log_steps(tmp_path, [1, 2])
    _log_steps(tmp_path, [1])  # fresh run, same dir: old file is kept aside, not appended to
    assert [r["step"] for r in read_jsonl(str(tmp_path / "metrics.jsonl"))] == [1]
    assert any(n.startswith("metrics.jsonl.old-") for n in os.listdir(tmp_path))


def test_tensorboard_and_config(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is an optional sink")
    _log_steps(tmp_path, [1, 2], tb=True)
    events = [n for n in os.listdir(tmp_path / "tb") if n.startswith("events.")]
    assert events and os.path.getsize(tmp_path / "tb" / events[0]) > 0
    MetricsLogger(str(tmp_path), tensorboard=False, progress=False, enabled=True,
                  resume_step=2).log_config({"reward_mode": "dualrpo"})
    assert json.loads((tmp_path / "config.json").read_text())["reward_mode"] == "dualrpo"


def test_progress_bar_and_disabled_rank(tmp_path, capsys):
    with MetricsLogger(str(tmp_path / "a"), total_steps=3, tensorboard=False, progress=True, enabled=True) as log:
        log.log(1, {"accuracy/all": 0.25, "self_certainty/all": 1.5})
    err = capsys.readouterr().err
    assert "accuracy=0.25" in err and "self_cert=1.5" in err
    off = MetricsLogger(str(tmp_path / "b"), enabled=False)
    assert off.log(1, {"x": float("inf")}) == {"step": 1, "time": pytest.approx(off.log(1, {})["time"], abs=5),
                                                 "x": None}
    off.close()
    assert not (tmp_path / "b").exists()  # non-zero ranks write nothing
