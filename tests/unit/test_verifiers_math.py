"""Math verifier: a hand-written table of equivalent / non-equivalent answer pairs."""
import builtins

import pytest

from dualrpo_mcore.verifiers.math_parse import to_sympy
from dualrpo_mcore.verifiers.tasks.math import equivalent
from dualrpo_mcore.verifiers.scoring import score, score_with_info

# (gold, prediction, expected equivalence)
TABLE = [
    # fractions and decimals
    (r"\frac{1}{2}", "0.5", True),
    (r"\frac{1}{2}", r"\dfrac12", True),
    (r"\frac{1}{2}", "1/2", True),
    ("0.5", r"\tfrac{1}{2}", True),
    (r"\frac{3}{4}", "0.75", True),
    (r"\frac{3}{4}", "0.7", False),
    (r"\frac{1}{3}", "0.3333333", True),
    (r"\frac{1}{3}", "0.33", False),
    (r"\frac{2}{4}", r"\frac{1}{2}", True),
    (r"2\frac{1}{2}", "2.5", True),
    ("0.1", "1/10", True),
    ("0.1", "0.01", False),
    # integers, negatives, thousands separators
    ("-3", "3", False),
    ("-3", "-3.0", True),
    (r"-\frac{1}{2}", "-0.5", True),
    (r"-\frac{1}{2}", "0.5", False),
    ("1,234", "1234", True),
    ("1234", "1,235", False),
    ("100000", "100001", False),
    ("42", "42", True),
    ("0", "0.0", True),
    # LaTeX vs plain, sqrt, pi
    (r"\sqrt{2}", "sqrt(2)", True),
    (r"\frac{\sqrt{2}}{2}", "1/sqrt(2)", True),
    (r"2\sqrt{3}", r"\sqrt{12}", True),
    (r"\sqrt{2}", "1.41", False),
    (r"\sqrt{2}", "1.4142136", True),
    (r"\pi", "pi", True),
    (r"\frac{\pi}{2}", "pi/2", True),
    (r"\pi", "3.14", False),
    (r"\pi", "3.14159265", True),
    (r"2\pi", "π*2", True),
    (r"\pi/3", r"\pi/6", False),
    ("2^{10}", "1024", True),
    ("2^{10}", "2**10", True),
    ("2^{10}", "1000", False),
    # scientific notation
    (r"1.5\times10^{3}", "1500", True),
    ("1.5e3", "1500", True),
    (r"3\times 10^{-8}", "3e-8", True),
    ("3e-8", "5e-8", False),
    (r"6.02\times10^{23}", "6.02e23", True),
    (r"6.02\times10^{23}", "6.02e22", False),
    # intervals
    ("[1,2)", "[1, 2)", True),
    ("[1,2)", "(1,2)", False),
    ("(1,2]", "(1,2)", False),
    (r"(-\infty, 3]", "(-inf, 3]", True),
    (r"(-\infty, 3]", r"(-\infty, 3)", False),
    (r"\left[ 0, 1 \right]", "[0,1]", True),
    # sets and tuples
    (r"\{1,2\}", "{2,1}", True),
    (r"\{1,2\}", r"\{1,2,3\}", False),
    (r"\{1, 2, 3\}", r"\{3, 1, 2\}", True),
    ("(1,2)", "(2,1)", False),
    ("(1,2,3)", "(1, 2, 3)", True),
    # units and degrees
    (r"5\text{ cm}", "5", True),
    ("5", r"5 \text{ cm}", True),
    (r"5\text{ cm}", "6 cm", False),
    (r"30^\circ", "30", True),
    (r"30^{\circ}", "30°", True),
    ("30", "30 degrees", True),
    (r"30^\circ", r"60^\circ", False),
    # percent
    (r"50\%", "0.5", True),
    ("50%", "50", True),
    (r"12\%", "0.12", True),
    (r"12\%", "0.13", False),
    # symbolic
    ("x^2+2x+1", "(x+1)^2", True),
    ("x^2+1", "(x+1)^2", False),
    ("x=5", "5", True),
    ("5", "x = 5", True),
    ("5", "x = 6", False),
    (r"\frac{a}{b}", "a/b", True),
]


@pytest.mark.parametrize("gold,pred,expected", TABLE, ids=[f"{g}|{p}" for g, p, _ in TABLE])
def test_equivalence_table(gold, pred, expected):
    assert len(TABLE) >= 60
    assert equivalent(gold, pred) is expected
    reward = score({"verifier": "math", "answer": gold}, f"so the result is \\boxed{{{pred}}}.")
    assert reward == float(expected)


def test_extraction_last_boxed_nested_and_answer_tags():
    spec = {"verifier": "math", "answer": r"\frac{1}{2}"}
    # boxes close together are one multi-answer (a wrong one among them costs the reward); a box
    # far before the last is a draft the model revised
    assert score(spec, r"first \boxed{3} then \boxed{\frac{1}{2}}") == 0.0
    assert score(spec, r"a draft: \boxed{3}." + " Checking it again step by step." * 3
                 + r" So \boxed{\frac{1}{2}}") == 1.0
    assert score(spec, r"\boxed{\frac{1}{2}} but finally \boxed{3}") == 0.0
    assert score(spec, r"\boxed{\frac{\sqrt{4}}{4}}") == 1.0  # nested braces
    assert score(spec, "<think>0.3</think><answer>0.5</answer>") == 1.0
    assert score(spec, r"<answer>so \boxed{0.5}</answer>") == 1.0
    assert score(spec, r"\boxed{\frac{1}{2}") == 0.0  # unbalanced: no answer
    assert score_with_info(spec, "the answer is 0.5")[1]["status"] == "unparsable"
    assert score({**spec, "params": {"fallback": "last_line"}}, "work\nthe answer: 1/2") == 1.0


def test_malformed_and_empty_responses():
    spec = {"verifier": "math", "answer": "3"}
    for resp in ["", r"\boxed{}", r"\boxed{", r"\boxed{\frac{}{}}", r"\boxed{)(}", "\x00" * 10,
                 r"\boxed{" + "{" * 500 + "}" * 500 + "}"]:
        assert score(spec, resp) == 0.0


@pytest.mark.parametrize("bomb", [
    "10^{10^{10}}", "9^{9^{9}}", "(10^{9999})^{9999}", "100000!", "((10)!)!",
    r"\sum_{i=1}^{10^9} i", r"\prod_{k=1}^{99999} k", "1" * 5000, "2^{99999999}",
    r"\int_0^1 x dx",
])
def test_bombs_rejected_quickly(bomb):
    reward, info = score_with_info({"verifier": "math", "answer": "1"}, rf"\boxed{{{bomb}}}")
    assert reward == 0.0 and info["status"] in ("unparsable", "ok")


def test_no_eval_on_the_math_path(monkeypatch):
    """No call of eval/exec happens while parsing and comparing answers (sympify would)."""
    calls = []
    real_eval, real_exec = builtins.eval, builtins.exec

    def spy_eval(*a, **k):
        calls.append(("eval", str(a[0])[:60]))
        return real_eval(*a, **k)

    def spy_exec(*a, **k):
        calls.append(("exec", str(a[0])[:60]))
        return real_exec(*a, **k)

    to_sympy.cache_clear()
    monkeypatch.setattr(builtins, "eval", spy_eval)
    monkeypatch.setattr(builtins, "exec", spy_exec)
    for gold, pred, _ in TABLE[::3]:
        score({"verifier": "math", "answer": gold}, rf"\boxed{{{pred}}}")
    score({"verifier": "math", "answer": "7"}, r"\boxed{__import__('os').system('true')}")
    assert calls == []
