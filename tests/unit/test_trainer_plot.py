"""`dualrpo plot`: smoothing against hand-computed values, labels, errors that name the file, and
real PNGs (valid, the expected size, not blank) for a GRPO and a DualRPO run overlaid."""
import json
import math
import random

import pytest

from dualrpo_mcore.cli import main
from dualrpo_mcore.trainer.metrics import MetricsLogger
from dualrpo_mcore.commands.plot import load_runs, smooth, task_names

TASKS = ["math", "counting", "ocr", "grounding"]


def test_smooth_by_hand():
    assert smooth([1.0, 2.0, 3.0, 4.0, 5.0], 3) == [1.0, 1.5, 2.0, 3.0, 4.0]
    # None / NaN points drop out of their windows; a window with none left is NaN.
    got = smooth([2.0, None, float("nan"), 6.0, 1.0], 2)
    assert got[0] == 2.0 and got[1] == 2.0 and math.isnan(got[2]) and got[3] == 6.0 and got[4] == 3.5
    assert smooth([3.0, 1.0], 1) == [3.0, 1.0]
    with pytest.raises(ValueError, match="window"):
        smooth([1.0], 0)


def _fake_run(d, mode, steps=60, seed=0, with_config=True, heldout=False):
    """Realistic-looking curves: accuracy rising per task, self-certainty rising under DualRPO."""
    rng = random.Random(seed)
    with MetricsLogger(str(d), tensorboard=False, progress=False, enabled=True) as log:
        if with_config:
            log.log_config({"algo": {"reward_mode": mode}, "seed": seed})
        for s in range(1, steps + 1):
            rec = {}
            for i, t in enumerate(TASKS):
                rec[f"accuracy/{t}"] = min(1.0, 0.2 + 0.1 * i + s / steps * 0.5 + rng.gauss(0, 0.05))
            rec["accuracy/all"] = sum(rec[f"accuracy/{t}"] for t in TASKS) / len(TASKS)
            rec["self_certainty/all"] = 1.0 + (0.02 if mode == "dualrpo" else 0.005) * s + rng.gauss(0, 0.05)
            rec["entropy/all"] = 2.0 - 0.01 * s + rng.gauss(0, 0.05)
            rec["kl"] = float("nan") if s == 7 else 0.01  # a null in the file must not break plotting
            if heldout and s % 20 == 0:  # a held-out eval every 20 steps, split by difficulty for two tasks
                for t in TASKS:
                    rec[f"eval/accuracy/{t}"] = 0.1 + s / steps * 0.3
                for t in TASKS[:2]:
                    for k in (1, 2, 3):
                        rec[f"eval/by_difficulty/accuracy/{t}/d{k}"] = 0.5 / k + s / steps * 0.2
            log.log(s, rec)
    return d


def _image_stats(path):
    from PIL import Image

    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        im = im.convert("L")
        lo, hi = im.getextrema()
        non_white = sum(1 for p in im.getdata() if p < 200)
        return im.size, lo, hi, non_white / (im.size[0] * im.size[1])


def test_cli_plots_two_runs(tmp_path, capsys):
    grpo = _fake_run(tmp_path / "run_grpo", "grpo", seed=1)
    dual = _fake_run(tmp_path / "run_dual", "dualrpo", seed=2, with_config=False)
    (dual / "metrics.jsonl").write_text(  # label from the first record when there is no config.json
        "\n".join(json.dumps(dict(json.loads(l), reward_mode="dualrpo")) if i == 0 else l
                  for i, l in enumerate((dual / "metrics.jsonl").read_text().splitlines())) + "\n")
    runs = load_runs([str(grpo), str(dual)])
    assert [r.label for r in runs] == ["grpo", "dualrpo"]
    assert task_names(runs) == ["counting", "grounding", "math", "ocr", "all"]

    out = tmp_path / "plots"
    assert main(["plot", str(grpo), str(dual), "--out", str(out), "--smooth", "5"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / "accuracy_per_task.png"), str(out / "self_certainty_entropy.png")]  # no held-out eval
    size, lo, hi, ink = _image_stats(out / "accuracy_per_task.png")
    assert size == (1350, 640)  # 3 x 2 panels at 4.5 x 3.2 in, 100 dpi
    assert lo < 100 and hi == 255 and 0.01 < ink < 0.6  # drawn lines on a white page
    size, lo, hi, ink = _image_stats(out / "self_certainty_entropy.png")
    assert size == (1000, 360) and lo < 100 and 0.01 < ink < 0.6


def test_labels_and_duplicate_modes(tmp_path):
    a = _fake_run(tmp_path / "a", "dualrpo", steps=5)
    b = _fake_run(tmp_path / "b", "dualrpo", steps=5)
    assert [r.label for r in load_runs([str(a), str(b)])] == ["dualrpo (a)", "dualrpo (b)"]
    assert [r.label for r in load_runs([str(a), str(b)], ["x", "y"])] == ["x", "y"]
    with pytest.raises(ValueError, match="2 names for 1 runs"):
        load_runs([str(a)], ["x", "y"])


def test_missing_or_empty_metrics_named(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert f"{tmp_path / 'empty' / 'metrics.jsonl'}: no metrics file" in capsys.readouterr().err
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "metrics.jsonl").write_text('{"step": 1, "accuracy/a')
    assert main(["plot", str(tmp_path / "torn"), "--out", str(tmp_path / "o")]) == 2
    assert "torn/metrics.jsonl: no step records" in capsys.readouterr().err


def test_heldout_figures_per_task_and_per_difficulty(tmp_path, capsys):
    runs = [_fake_run(tmp_path / m, m, seed=i, heldout=True) for i, m in enumerate(("grpo", "dualrpo"))]
    loaded = load_runs([str(r) for r in runs])
    assert task_names(loaded, "eval/accuracy/") == ["counting", "grounding", "math", "ocr"]
    assert task_names(loaded, "eval/by_difficulty/accuracy/") == [f"{t}/d{k}" for t in ("counting", "math")
                                                                  for k in (1, 2, 3)]
    assert loaded[0].series("eval/accuracy/math") == ([20, 40, 60], pytest.approx([0.2, 0.3, 0.4]))
    out = tmp_path / "plots"
    assert main(["plot", *map(str, runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed[2:] == [str(out / "heldout_per_task.png"), str(out / "heldout_by_difficulty.png")]
    size, lo, hi, ink = _image_stats(out / "heldout_per_task.png")
    assert size == (1350, 640) and lo < 100 and 0.01 < ink < 0.6  # 4 tasks: 3 x 2 panels
    size, lo, hi, ink = _image_stats(out / "heldout_by_difficulty.png")
    assert size == (900, 320) and lo < 100 and 0.01 < ink < 0.6  # 2 tasks: 2 panels in one row
