"""The demo's before/after tables, from hand-made eval dicts."""
import pytest

from dualrpo_mcore.commands.demo import difficulty_table, print_table, results_table


def test_results_table_means_over_tasks_in_both_evals():
    before = {"all": 0.9, "math": 0.25, "ocr": 0.5, "counting": 0.1}
    after = {"all": 0.1, "math": 0.5, "ocr": 0.25}  # counting missing after: left out of both means
    t = results_table(before, after)
    assert list(t["tasks"]) == ["math", "ocr"]  # the demo's task order, "all" never a row
    assert t["tasks"]["math"] == pytest.approx(dict(before=25.0, after=50.0, delta=25.0))
    assert t["mean_before"] == pytest.approx(37.5) and t["mean_after"] == pytest.approx(37.5)
    assert t["mean_delta"] == pytest.approx(0.0)


def test_difficulty_table_orders_by_task_then_level_and_keeps_only_shared_keys(capsys):
    before = {"ocr/d1": 0.5, "math/d2": 0.25, "math/d1": 0.0, "grounding/d3": 0.1}
    after = {"ocr/d1": 0.75, "math/d2": 0.5, "math/d1": 1.0, "chart/d1": 0.3}
    split = difficulty_table(before, after)
    assert list(split) == ["math/d1", "math/d2", "ocr/d1"]  # math before ocr in the demo's order
    assert split["math/d1"] == pytest.approx(dict(before=0.0, after=100.0))
    assert difficulty_table({}, after) == {}  # an eval written before the split existed

    table = results_table({"math": 0.1}, {"math": 0.2})
    table["by_difficulty"] = split
    print_table(table, "dualrpo")
    out = capsys.readouterr().out
    assert "By difficulty" in out and "d1   0.0 -> 100.0" in out and "d2  25.0 ->  50.0" in out
