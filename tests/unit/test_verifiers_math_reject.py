"""Answers the math verifier must never accept, and the multi-answer rule.

A false positive pays a policy for a wrong answer, and RL finds such answers on purpose: lists
that contain the gold, a second box with a guess, code that evaluates to the right number. Every
response below is scored raw, wrapped in ``<answer>``, and with the ``last_line`` and ``full``
fallbacks; none may earn anything. Their correct twins (further down) must score 1, so that a
rejection is for the right reason and not because nothing could be read.
"""
import pytest

from dualrpo_mcore.verifiers.scoring import score

MUST_NOT_MATCH = [
    # several answers offered for one
    ("list", r"\frac{1}{2}", "1/2 or 3"),
    ("list", "3", "1/2 or 3"),
    ("list", r"\frac{1}{2}", "The answer is 1/2 or 3."),
    ("list", "3", "The answer is $1/2$ or $3$."),
    ("list", r"\frac{1}{2}", r"\boxed{\frac{1}{2}, 3}"),
    ("list", "2", "x = 2 or x = 3"),
    ("list", "2", r"\boxed{2 \text{ or } 3}"),
    ("list", "5", "Final Answer: The final answer is $5$ or $6$. I hope it is correct."),
    # two boxes, one of them wrong
    ("boxes", "2", r"\boxed{1} \boxed{2}"),
    ("boxes", "2", r"\boxed{2} or \boxed{3}"),
    ("boxes", "2", r"The integers are \boxed{2} and \boxed{-2}."),
    ("boxes", r"\frac{1}{2}", r"first \boxed{3} then \boxed{\frac{1}{2}}"),
    ("boxes", "(2, 2), (6, 2)", r"\boxed{(2, 2)} \quad \text{and} \quad \boxed{(6, 3)}"),
    ("boxes", "k = 45, n = 2", r"\boxed{k = 45} and \boxed{n = 3}"),
    # a multi-answer gold with an answer missing or one too many
    ("multi", "(2, 2), (6, 2)", r"\boxed{(2, 2)}"),
    ("multi", "1, 2", r"\boxed{1}, \boxed{2}, \boxed{3}"),
    ("multi", r"\{1, 2\}", r"\boxed{\{1, 2, 3\}}"),
    ("multi", "1, 2", r"\boxed{1}"),
    ("multi", r"1 \pm \sqrt{19}", r"\boxed{1 + \sqrt{19}}"),
    ("multi", "k = 45, n = 2", r"\boxed{k = 45}"),
    # intervals: every bracket counts
    ("interval", "[1,2)", "[1,2]"),
    ("interval", "[1,2)", "(1,2)"),
    ("interval", r"(-\infty, 3]", r"(-\infty, 3)"),
    ("interval", r"\{-1\} \cup [0,7)", r"\{-1\} \cup [0,7]"),
    ("interval", "[1,2]", r"\{1, 2\}"),
    # a coefficient, a variable, a root or a power too many
    ("form", "2", "2x"),
    ("form", "2", "x^2"),
    ("form", "2", r"2\pi"),
    ("form", r"\sqrt{2}", "2"),
    ("form", "4", r"4\sqrt{2}"),
    ("form", "x+1", "x+2"),
    # order counts in tuples
    ("order", "(1,2)", "(2,1)"),
    ("order", "(1,2,3)", "(1,3,2)"),
    ("order", "(1,2)", "(1,2,3)"),
    # relations: strictness and direction
    ("relation", "x < 5", r"x \le 5"),
    ("relation", r"x \geq 5", "x > 5"),
    ("relation", r"x \geq 5", r"x \leq 5"),
    ("relation", r"x \ge 5", r"5 \ge x"),
    ("relation", r"x \neq 5", "x = 5"),
    ("relation", "x = 5", r"x \neq 5"),
    ("relation", r"-2 \le x \le 7", "-2 < x < 7"),
    ("relation", "2x + z = 1", "1"),
    # code that would evaluate to the right number
    ("code", "7", r"\boxed{__import__('os').system('true') or 7}"),
    ("code", "7", "__import__('os').system('true') or 7"),
    ("code", "7", "The answer is __import__('os').getpid() and 7"),
    ("code", "7", "(lambda: 7)()"),
    ("code", "7", "eval('7')"),
    ("code", "7", "print(7)"),
    ("code", "7", "7 if __import__('os') else 7"),
    ("code", "7", "int('7')"),
    ("code", "7", "$(echo 7) 7"),
    ("code", "7", "`echo 7`"),
    ("code", "7", "exec('x=7'); x"),
    ("code", "7", r"\boxed{sympify('7')}"),
    # close, but another number
    ("number", "3", "-3"),
    ("number", r"\frac{1}{3}", "0.33"),
    ("number", r"\pi", "3.14"),
    ("number", r"\frac{8}{3}", "2.67"),
    ("number", "1.234", "1,234"),
    ("number", r"\{1, 2\}", "1.2"),
    ("number", "1000", "100"),
    ("number", "2", "AZYUK2A"),
    ("number", "12", "12.5"),
    # where the answer is read from
    ("reading", "9", "Answer $ \n 9 \n $"),
    ("reading", "9", "Answer \\( \n 9 \n \\)"),
    ("reading", "2", r"<answer>\boxed{3}</answer> and later \boxed{2}"),
    ("reading", "2", r"\boxed{2"),
    ("reading", "7", "The answer is not 7, it is 8."),
    ("reading", "7", "Final Answer: The final answer is not $7$ but $8$."),
    ("reading", r"\text{C}", r"\boxed{\text{D}}"),
    ("reading", "10", r"\boxed{10} was my first guess, but checking it again it is wrong. "
                      r"The final answer is $12$. I hope it is correct."),
]

CORRECT_TWINS = [
    ("1, 2", r"\boxed{2} and \boxed{1}"),
    ("(2, 2), (6, 2)", r"\boxed{(6, 2)}, \boxed{(2, 2)}"),
    ("(2, 2), (6, 2)", r"\boxed{(2, 2)} \quad \text{and} \quad \boxed{(6, 2)}"),
    ("k = 45, n = 2", r"\boxed{k = 45} \quad \text{and} \quad \boxed{n = 2}"),
    (r"\{1,2\}", "The answer is $2$ and $1$."),
    ("2, 3", "x = 2 or x = 3"),
    (r"1 \pm \sqrt{19}", r"\boxed{1 - \sqrt{19}}, \boxed{1 + \sqrt{19}}"),
    (r"\boxed{1}\boxed{2}", r"\boxed{1,2}"),
    ("x >= 5", r"x \geq 5"),
    (r"x \le 5", r"5 \geq x"),
    ("x != 3", r"x \neq 3"),
    ("x < 3", r"x \lt 3"),
    (r"-2 \le x \le 7", r"x \in [-2,7]"),
    ("1000", "1 000"),
    ("32349", r"32,\! 349"),
    ("1000.99", "the number is not 10 which is 1,000.99€"),
    ("1000.99", "1000,99"),
    ("2.74", "Soucis : 2,74 $ a.."),
    (r"\boxed{\text{C}}", r"\boxed{\text{(C)}}"),
    ("34", "Final Answer: The largest $n$ is 34."),
    (r"x \in \boxed{\{-1\} \cup [0,7)}.$", r"x \in \boxed{\{-1\} \cup [0,7)}.$"),
    ("12", r"\boxed{10} was my first guess, but checking it again it is wrong. "
           r"The final answer is $12$. I hope it is correct."),
    ("8", "The answer is not 7, it is 8."),
    ("7", "<answer>7</answer>"),
    ("(1,2)", r"\boxed{(1, 2)}"),
]


def _scores(gold: str, response: str):
    spec = {"verifier": "math", "answer": gold}
    out = [score(spec, response), score(spec, f"<answer>{response}</answer>")]
    out += [score({**spec, "params": {"fallback": fb}}, response) for fb in ("last_line", "full")]
    return out


def test_battery_covers_every_kind():
    kinds = {k for k, _, _ in MUST_NOT_MATCH}
    assert kinds == {"list", "boxes", "multi", "interval", "form", "order", "relation", "code",
                     "number", "reading"}
    assert len(MUST_NOT_MATCH) >= 60


@pytest.mark.parametrize("kind,gold,response", MUST_NOT_MATCH,
                         ids=[f"{k}:{g}|{r[:40]}" for k, g, r in MUST_NOT_MATCH])
def test_must_not_match(kind, gold, response):
    assert _scores(gold, response) == [0.0] * 4


@pytest.mark.parametrize("gold,response", CORRECT_TWINS,
                         ids=[f"{g}|{r[:40]}" for g, r in CORRECT_TWINS])
def test_correct_twins_match(gold, response):
    spec = {"verifier": "math", "answer": gold}
    assert max(score(spec, response), score(spec, f"<answer>{response}</answer>")) == 1.0
