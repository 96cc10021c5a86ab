"""The demo's result with its interval: results_*.json and the printed table carry the paired bootstrap
of each run's change and of DualRPO - GRPO, and `dualrpo plot` draws them, from per-prompt eval files."""
import argparse
import json

import numpy as np
import pytest

from dualrpo_mcore.commands import demo, plot
from dualrpo_mcore.trainer.bootstrap import pair, paired_interval
from dualrpo_mcore.trainer.metrics import MetricsLogger

TASKS = ["math", "ocr", "counting"]


def _run(out, mode, before, after, per_prompt=True):
    """A run directory as the RL stage leaves it: metrics, config, eval files (60 prompts per task)."""
    d = out / f"run_{mode}"
    with MetricsLogger(str(d), tensorboard=False, progress=False, enabled=True) as log:
        log.log_config({"reward_mode": mode})
        for s in range(1, 4):
            log.log(s, {f"accuracy/{t}": 0.1 * s for t in TASKS} | {"accuracy/all": 0.1 * s})
    tasks = [TASKS[i % 3] for i in range(len(before))]
    for name, correct, step in (("before", before, 0), ("after", after, 3)):
        accuracy = {t: float(np.mean([c for c, k in zip(correct, tasks) if k == t])) for t in TASKS}
        doc = {"step": step, "accuracy": accuracy, "by_difficulty": {}}
        if per_prompt:
            doc["per_prompt"] = [{"uid": f"heldout:h.parquet:{i}", "task": t, "difficulty": None, "accuracy": float(c)}
                                 for i, (t, c) in enumerate(zip(tasks, correct))]
        (d / f"eval_{name}.json").write_text(json.dumps(doc))
    return d


@pytest.fixture
def demo_out(tmp_path):
    rng = np.random.default_rng(7)
    before = rng.integers(0, 2, 180)
    afters = {"dualrpo": np.where(rng.random(180) < 0.8, before, 1), "grpo": np.where(rng.random(180) < 0.9, before, 1)}
    for mode, after in afters.items():
        _run(tmp_path, mode, before, after)
    return tmp_path, before, afters


def test_intervals_in_the_results_are_the_bootstrap_in_points(demo_out):
    out, before, afters = demo_out
    iv = demo.intervals_table(str(out), "grpo")
    assert iv["available"] and set(iv["rl"]) == {"dualrpo", "grpo"} and list(iv["runs"]) == ["dualrpo - grpo"]
    assert iv["level"] == 0.95 and iv["resamples"] == 10_000 and iv["seed"] == 0
    paired = pair(*({f"heldout:h.parquet:{i}": (TASKS[i % 3], float(c)) for i, c in enumerate(x)}
                    for x in (before, afters["grpo"])))
    ref = paired_interval(*paired)
    got = iv["rl"]["grpo"]
    assert got["mean"]["low"] == pytest.approx(100 * ref["mean"]["low"])
    assert got["tasks"]["ocr"]["high"] == pytest.approx(100 * ref["tasks"]["ocr"]["high"])
    # the point estimate is the table's own delta: mean over tasks of after - before, in points
    table = demo.results_table(*(json.loads((out / "run_grpo" / f"eval_{w}.json").read_text())["accuracy"]
                                 for w in ("before", "after")))
    assert got["mean"]["delta"] == pytest.approx(table["mean_delta"])
    assert set(got["mean"]) == {"before", "after", "delta", "low", "high"}
    assert set(iv["runs"]["dualrpo - grpo"]["tasks"]["math"]) == {"n", "grpo", "dualrpo", "delta", "low", "high"}
    diff = iv["runs"]["dualrpo - grpo"]["mean"]
    assert diff["delta"] == pytest.approx(diff["dualrpo"] - diff["grpo"])
    expected = np.mean([(afters["dualrpo"][k::3] - afters["grpo"][k::3]).mean() for k in range(3)]) * 100
    assert diff["delta"] == pytest.approx(expected) and diff["low"] <= diff["delta"] <= diff["high"]


def test_the_printed_table_shows_each_interval(demo_out, capsys):
    out, _, _ = demo_out
    before, after = (json.loads((out / "run_dualrpo" / f"eval_{w}.json").read_text())["accuracy"]
                     for w in ("before", "after"))
    table = demo.results_table(before, after)
    table["intervals"] = demo.intervals_table(str(out), "dualrpo")
    demo.print_table(table, "dualrpo")
    demo.print_intervals(table, "dualrpo")
    text = capsys.readouterr().out
    mean = table["intervals"]["rl"]["dualrpo"]["mean"]
    assert "95% interval" in text and f"[{mean['low']:+5.1f}, {mean['high']:+5.1f}]" in text
    diff = table["intervals"]["runs"]["dualrpo - grpo"]["mean"]
    assert (f"DUALRPO - GRPO after RL, same prompts (points): mean {diff['delta']:+.1f} "
            f"[{diff['low']:+5.1f}, {diff['high']:+5.1f}]") in text
    json.dumps(table)  # results_*.json takes it as it is


def test_eval_files_without_per_prompt_results_say_so(tmp_path, capsys):
    _run(tmp_path, "dualrpo", [0, 1, 1] * 10, [1, 1, 1] * 10, per_prompt=False)
    iv = demo.intervals_table(str(tmp_path), "dualrpo")
    assert not iv["available"] and "run_dualrpo: eval_before.json / eval_after.json have no per-prompt" in iv["reason"]
    demo.print_intervals({"intervals": iv}, "dualrpo")
    assert "(no interval:" in capsys.readouterr().out
    args = argparse.Namespace(runs=[str(tmp_path / "run_dualrpo")], out=str(tmp_path / "plots"), smooth=1, labels=None)
    assert plot.run(args) == 0
    assert not (tmp_path / "plots" / plot.INTERVAL_FIGURE).exists()


def test_plot_draws_the_interval_figure(demo_out):
    out, _, _ = demo_out
    args = argparse.Namespace(runs=[str(out / "run_dualrpo"), str(out / "run_grpo")], out=str(out / "plots"),
                              smooth=1, labels=None)
    assert plot.run(args) == 0
    from PIL import Image

    path = out / "plots" / plot.INTERVAL_FIGURE
    with Image.open(path) as im:
        gray = np.asarray(im.convert("L"))
    assert gray.shape == (400, 1400)  # two panels: each run's change, and the difference between them
    assert (gray < 200).mean() > 0.01
