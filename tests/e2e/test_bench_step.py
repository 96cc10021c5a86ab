"""``dualrpo bench step`` and ``dualrpo bench rollout`` as a user runs them, at small sizes.

``step``: 2 RL steps of the tiny_cpu recipe on a synthetic data set; every phase of the loop
(rollout, verify, logprob, update, sync) is reported for every step with a finite, non-negative
time, the shares add up, and the JSON carries the run's metadata. ``rollout``: the HF engine and the
``model.generate`` baseline both produce exactly the requested tokens; SGLang is skipped with a
reason on CPU. No wall-clock value is asserted."""
import json
import math

from helpers.cli import run_dualrpo

PHASES = ("rollout", "verify", "logprob", "update", "sync", "probe")


def test_bench_step_reports_every_phase(tmp_path):
    out = tmp_path / "step.json"
    stdout = run_dualrpo("bench", "step", "--steps", "2", "--prompts-per-step", "2", "--group-size", "2",
                         "--max-new-tokens", "6", "--json", str(out), threads=2).stdout
    for p in PHASES:
        assert f"\n{p} " in stdout, p
    doc = json.loads(out.read_text())
    assert doc["bench"] == "step" and doc["commit"] and "bench step" in doc["command"]
    s = doc["results"]["summary"]
    assert [r["step"] for r in s["per_step"]] == [1, 2] and s["measured_steps"] == [2]
    assert not s["missing_phases"]
    for row in s["per_step"]:
        for p in PHASES:
            assert math.isfinite(row[p]) and row[p] >= 0, (row["step"], p)
        assert row["total"] > 0 and abs(sum(row[p] for p in PHASES) - row["total"]) <= 1e-6 * max(1, row["total"])
    assert abs(sum(s["share"].values()) - 1) < 1e-9


def test_bench_step_bad_flags_are_named(tmp_path):
    cases = ((["--warmup", "3", "--steps", "2"], "--warmup"), (["--data", str(tmp_path)], "--data"),
             (["--engines", "compare", "--baseline-set", "schedule.epochs=2"], "--baseline-set"),
             (["--baseline-set", "actor.model.dedup_image=false"], "actor.model.dedup_image"))
    for args, flag in cases:
        proc = run_dualrpo("bench", "step", *args, timeout=120, check=False)
        assert proc.returncode == 2 and flag in proc.stdout, proc.stdout


def test_bench_rollout_counts_tokens(tmp_path):
    out = tmp_path / "rollout.json"
    run_dualrpo("bench", "rollout", "--prompts", "1", "--n", "2", "--max-new-tokens", "4", "--image", "4x4",
                "--iters", "1", "--warmup", "0", "--json", str(out), threads=2)
    doc = json.loads(out.read_text())
    rows = {r["method"]: r for r in doc["results"]["rows"]}
    assert set(rows) == {"generate (baseline)", "hf-engine"}
    for name, r in rows.items():
        assert r["tokens"] == 1 * 2 * 4, (name, r["tokens"])  # EOS disabled: exactly the cap
        assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0
    assert "sglang" in doc["results"]["skipped"]


def test_bench_step_baseline_overrides(tmp_path):
    out = tmp_path / "ab.json"
    stdout = run_dualrpo("bench", "step", "--steps", "2", "--prompts-per-step", "2", "--group-size", "2",
                         "--max-new-tokens", "4", "--baseline-set", "actor.model.dedup_images=false", "--json",
                         str(out), threads=2).stdout
    assert "overrides: ['actor.model.dedup_images=false']" in stdout
    assert "this vs baseline (baseline); ratio = baseline / this" in stdout
    for p in PHASES + ("total",):
        assert f"\n{p:<10} baseline " in stdout, p
    doc = json.loads(out.read_text())
    assert set(doc["results"]) == {"baseline", "this"}
    assert doc["args"]["baseline_set"] == ["actor.model.dedup_images=false"]
