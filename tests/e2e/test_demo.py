"""``dualrpo demo`` end to end with tiny settings (mechanics only, no accuracy claims): synth -> SFT ->
RL under torchrun (2 processes, TP=2) with held-out eval before/after -> plots -> HF export; then
``--resume`` skips every finished stage."""
import json
import os

from helpers.cli import run_dualrpo

TINY = ["--num-per-task", "2", "--heldout-per-task", "1", "--sft-steps", "2", "--sft-batch-size", "4",
        "--steps", "2", "--group-size", "2", "--prompts-per-step", "2", "--max-new-tokens", "8",
        "--eval-every", "1", "--time-budget-min", "10", "--set", "verifier.timeout_s=6"]


def _demo(out, *extra, timeout=240):
    return run_dualrpo("demo", "--out", out, *TINY, *extra, timeout=timeout, check=False)


def test_demo_end_to_end_and_resume(tmp_path):
    out = str(tmp_path / "demo")
    proc = _demo(out)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "Held-out accuracy" in proc.stdout and "mean" in proc.stdout

    with open(os.path.join(out, "results_dualrpo.json")) as f:
        res = json.load(f)
    assert res["reward_mode"] == "dualrpo" and res["rl_steps"] == 2
    assert set(res["tasks"]) and all({"before", "after", "delta"} <= set(r) for r in res["tasks"].values())
    assert {"synth", "sft", "rl", "plot"} <= set(res["stage_seconds"])
    levels = res["by_difficulty"]  # the synthetic rows carry a difficulty, so the split is there
    assert levels and all(k.rpartition("/")[0] in res["tasks"] and k.rpartition("/")[2][0] == "d" for k in levels)
    assert "By difficulty" in proc.stdout
    # The per-prompt evaluations reached the driver: the change has its paired bootstrap interval.
    iv = res["intervals"]
    assert iv["available"], iv
    mean = iv["rl"]["dualrpo"]["mean"]
    assert mean["low"] <= mean["delta"] <= mean["high"] and set(iv["rl"]["dualrpo"]["tasks"]) <= set(res["tasks"])
    assert os.path.isfile(os.path.join(out, "run_dualrpo", "eval", "step_000000.json"))
    with open(os.path.join(out, "data", "manifest.json")) as f:
        assert json.load(f)["layout"] == "grid", "the demo's data must be the grid layout"
    pngs = [f for f in os.listdir(os.path.join(out, "plots")) if f.endswith(".png")]
    assert pngs, "no plots written"
    run_dir = os.path.join(out, "run_dualrpo")
    assert os.path.isdir(os.path.join(run_dir, "checkpoints", "step_00000002"))
    with open(os.path.join(run_dir, "config.json")) as f:
        resolved = json.load(f)
    assert resolved["actor"]["parallel"]["tp"] == 2
    assert resolved["verifier"]["timeout_s"] == 6.0, "--set must reach the RL stage's config"

    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(os.path.join(out, "hf_dualrpo"))
    assert sum(p.numel() for p in model.parameters()) > 0

    # A second run of the same --out without --resume refuses; with --resume it skips to plot + table.
    again = _demo(out)
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = _demo(out, "--resume")
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    assert "[demo] rl:" not in resumed.stdout and "[demo] sft:" not in resumed.stdout


def test_demo_refuses_a_bad_set_before_the_warm_start(tmp_path):
    out = str(tmp_path / "demo")
    proc = _demo(out, "--set", "schedule.mini_batchs=2", timeout=120)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "schedule has no field 'mini_batchs'" in proc.stderr and "mini_batches" in proc.stderr
    assert not os.path.exists(os.path.join(out, "data", "sft")), "the SFT stage ran before the config was checked"
