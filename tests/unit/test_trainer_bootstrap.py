"""The paired bootstrap interval against the exact bootstrap distribution (every resample enumerated
in float64), its coverage on simulated evaluations with a known true change, and its file contract."""
import itertools
import json

import numpy as np
import pytest

from dualrpo_mcore.trainer.bootstrap import describe, load_per_prompt, pair, paired_interval, run_intervals


def _exact_means(d):
    """Every one of the n^n equally likely resamples of ``d``'s mean, brute force in float64."""
    n = len(d)
    return np.array([sum(d[i] for i in idx) / n for idx in itertools.product(range(n), repeat=n)])


def _assert_is_exact_quantile(low, high, exact, level=0.95, tol=0.006):
    """``low``/``high`` sit where the exact distribution puts 2.5% / 97.5% of its mass (within the
    Monte Carlo error of 20,000 resamples: tol is about 5 standard errors of a 2.5% quantile)."""
    tail = (1 - level) / 2
    assert np.mean(exact < low) <= tail + tol and np.mean(exact <= low) >= tail - tol, (low, np.mean(exact < low))
    assert np.mean(exact > high) <= tail + tol and np.mean(exact >= high) >= tail - tol, (high, np.mean(exact > high))


def test_one_task_matches_the_enumerated_bootstrap():
    rng = np.random.default_rng(11)
    base, new = rng.random(5), rng.random(5)
    out = paired_interval(["math"] * 5, base, new, resamples=20_000, seed=1)
    exact = _exact_means(new - base)
    r = out["tasks"]["math"]
    _assert_is_exact_quantile(r["low"], r["high"], exact)
    assert r["delta"] == pytest.approx(np.mean(new - base), abs=1e-15) and r["n"] == 5
    assert out["mean"]["low"] == r["low"] and out["mean"]["high"] == r["high"]  # one task: its mean is the task


def test_the_mean_over_tasks_resamples_within_each_task():
    rng = np.random.default_rng(5)
    tasks = ["a"] * 4 + ["b"] * 5
    base, new = rng.random(9), rng.random(9)
    d = new - base
    out = paired_interval(tasks, base, new, resamples=20_000, seed=2)
    ea, eb = _exact_means(d[:4]), _exact_means(d[4:])
    exact_mean = ((ea[:, None] + eb[None, :]) / 2).ravel()  # strata resampled independently
    _assert_is_exact_quantile(out["mean"]["low"], out["mean"]["high"], exact_mean)
    _assert_is_exact_quantile(out["tasks"]["b"]["low"], out["tasks"]["b"]["high"], eb)
    assert out["mean"]["delta"] == pytest.approx((d[:4].mean() + d[4:].mean()) / 2, abs=1e-15)
    # a pooled (unstratified) resample would weigh task b 5:4 and give another point estimate
    assert out["mean"]["delta"] != pytest.approx(d.mean(), abs=1e-6)


def test_a_constant_change_has_a_zero_width_interval_and_the_seed_fixes_the_draws():
    base = np.array([0, 1, 0, 1, 1, 0], dtype=float)
    out = paired_interval(["t"] * 6, base, base + 0.0, resamples=500)
    assert out["mean"]["low"] == out["mean"]["high"] == 0.0
    rng = np.random.default_rng(0)
    tasks, b, n = ["x", "y"] * 50, rng.integers(0, 2, 100).astype(float), rng.integers(0, 2, 100).astype(float)
    one, two = paired_interval(tasks, b, n, resamples=300, seed=4), paired_interval(tasks, b, n, resamples=300, seed=4)
    assert one == two
    assert paired_interval(tasks, b, n, resamples=300, seed=5)["mean"] != one["mean"]


def test_coverage_of_the_true_change_on_simulated_evaluations():
    """Prompts from a population whose true change is known: greedy correctness before ~ B(0.3), and
    after keeps most answers (paired) with a +0.1 true gain per task. About 95% of intervals hold it."""
    rng = np.random.default_rng(2026)
    trials, n, covered, widths = 200, 150, 0, []
    for _ in range(trials):
        tasks, base, new = [], [], []
        for task, p in (("math", 0.3), ("ocr", 0.5)):
            b = rng.random(n) < p
            # after: right ones stay right w.p. 0.9, wrong ones turn right w.p. q, so P(after)=p+0.1
            q = (p + 0.1 - 0.9 * p) / (1 - p)
            a = np.where(b, rng.random(n) < 0.9, rng.random(n) < q)
            tasks += [task] * n
            base.append(b)
            new.append(a)
        out = paired_interval(tasks, np.concatenate(base), np.concatenate(new), resamples=1000,
                              seed=int(rng.integers(1 << 30)))
        covered += out["mean"]["low"] <= 0.1 <= out["mean"]["high"]
        widths.append(out["mean"]["high"] - out["mean"]["low"])
    assert 0.90 <= covered / trials <= 0.99, covered / trials
    # and it is informative: the analytic paired standard error gives a width of about 2 x 1.96 x 0.025
    assert 0.07 < np.median(widths) < 0.13, np.median(widths)


def _eval_file(path, rows, accuracy=None):
    path.write_text(json.dumps({"step": 0, "accuracy": accuracy or {}, "per_prompt": rows}))
    return str(path)


def _rows(tasks, correct, prefix="h"):
    return [{"uid": f"{prefix}:{i}", "task": t, "difficulty": 1, "accuracy": float(c)}
            for i, (t, c) in enumerate(zip(tasks, correct))]


def test_eval_files_are_checked_and_paired_by_prompt_id(tmp_path):
    path = _eval_file(tmp_path / "e.json", _rows(["a", "b"], [1, 0]))
    assert load_per_prompt(path) == {"h:0": ("a", 1.0), "h:1": ("b", 0.0)}
    (tmp_path / "old.json").write_text(json.dumps({"step": 0, "accuracy": {"a": 0.5}}))
    assert load_per_prompt(str(tmp_path / "old.json")) is None
    bad = _eval_file(tmp_path / "bad.json", [{"uid": "x", "task": "a", "accuracy": float("nan")}])
    with pytest.raises(ValueError, match=r"bad.json: per_prompt\[0\]: accuracy must be a finite number"):
        load_per_prompt(bad)
    dup = _eval_file(tmp_path / "dup.json", _rows(["a", "a"], [1, 0], prefix="x")[:1] * 2)
    with pytest.raises(ValueError, match=r"dup.json: per_prompt\[1\]: prompt id 'x:0' appears twice"):
        load_per_prompt(dup)
    # pairing goes by id, not by position
    tasks, b, n = pair({"p": ("a", 0.0), "q": ("b", 1.0)}, {"q": ("b", 0.0), "p": ("a", 1.0)})
    assert tasks == ["a", "b"] and list(b) == [0.0, 1.0] and list(n) == [1.0, 0.0]
    with pytest.raises(ValueError, match="different held-out prompts: 1 only in before"):
        pair({"p": ("a", 0.0), "q": ("a", 0.0)}, {"p": ("a", 1.0)}, "before", "after")
    with pytest.raises(ValueError, match="prompt 'p' is task 'a' in before but 'b' in after"):
        pair({"p": ("a", 0.0)}, {"p": ("b", 1.0)}, "before", "after")


def test_run_intervals_reads_both_runs_and_compares_them_on_the_same_prompts(tmp_path):
    rng = np.random.default_rng(3)
    tasks = ["math", "ocr"] * 40
    before = rng.integers(0, 2, 80)
    after = {m: rng.integers(0, 2, 80) for m in ("dualrpo", "grpo")}
    runs = {}
    for mode in ("dualrpo", "grpo"):
        d = tmp_path / f"run_{mode}"
        d.mkdir()
        _eval_file(d / "eval_before.json", _rows(tasks, before))
        _eval_file(d / "eval_after.json", _rows(tasks, after[mode]))
        runs[mode] = str(d)
    (tmp_path / "run_old").mkdir()  # no eval files: left out, not an error
    out = run_intervals(dict(runs, old=str(tmp_path / "run_old")), resamples=400)
    assert set(out["rl"]) == {"dualrpo", "grpo"} and set(out["runs"]) == {"dualrpo - grpo"}
    # the same draws as a direct call on the prompts in id order (the canonical order pairing uses)
    paired = pair(*(load_per_prompt(f"{runs[m]}/eval_after.json") for m in ("grpo", "dualrpo")))
    assert out["runs"]["dualrpo - grpo"] == paired_interval(*paired, resamples=400)
    assert out["runs"]["dualrpo - grpo"]["mean"]["delta"] == pytest.approx(
        np.mean([(after["dualrpo"][k::2] - after["grpo"][k::2]).mean() for k in (0, 1)]))
    ocr = out["rl"]["dualrpo"]["tasks"]["ocr"]
    assert ocr["delta"] == pytest.approx(after["dualrpo"][1::2].mean() - before[1::2].mean())
    assert describe(out["rl"]["dualrpo"]["mean"]).count("[") == 1
