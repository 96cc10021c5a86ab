"""The math verifier against a suite nobody here wrote: math-verify's own regression tests.

``tests/data/math_verify_cases.json`` holds the ``(gold, pred, expected)`` rows of the
``pytest.mark.parametrize`` tables in huggingface/Math-Verify's ``tests/test_all.py``,
``test_boxed.py``, ``test_numina_cases.py`` and ``test_open_thoughts.py`` (MIT; the file records
the commit and the notice), extracted by ``scripts/extract_math_verify_cases.py``. Each prediction
is scored raw and wrapped in ``<answer>``, taking the better score, with the spec
``{"verifier": "math", "answer": gold}`` and no per-test settings: math-verify's tests pass some
(``precision=2``, ``allow_set_relation_comp=True``) that its default call does not use either.

On the file's commit math-verify's default ``verify(parse(gold), parse(pred))`` agrees with 248
of the 253 rows (98.0%); the misses it shares with us need those settings.
"""
import builtins
import collections
import json
from pathlib import Path

import pytest

from dualrpo_mcore.verifiers.tasks import math as math_task
from dualrpo_mcore.verifiers.scoring import score

CASES_FILE = Path(__file__).resolve().parents[1] / "data" / "math_verify_cases.json"
MIN_AGREEMENT = 0.98
SHORT_GOLD_CHARS = 40  # a gold this short is an answer, not a worked solution


def _load():
    with open(CASES_FILE, encoding="utf-8") as f:
        return json.load(f)


def _score_case(gold: str, pred: str) -> float:
    spec = {"verifier": "math", "answer": gold}
    return max(score(spec, pred), score(spec, f"<answer>{pred}</answer>"))


@pytest.fixture(scope="module")
def outcomes():
    """Per case ``(case, our score)``, scored cold (caches cleared), with every entry point that
    evaluates text as Python watched: model text must never reach one."""
    import sympy.parsing.sympy_parser as sympy_parser
    import sympy.physics.units  # noqa: F401  (its import sympifies constant names: not model text)

    data = _load()
    _score_case("1", r"\boxed{(x+1)^2 = 3, [1,2)}")  # lazy imports happen before the watch starts
    evaluated = []
    real_eval, real_exec, real_parse = builtins.eval, builtins.exec, sympy_parser.parse_expr

    def spy_eval(src, *a, **k):
        evaluated.append(("eval", str(src)[:80]))
        return real_eval(src, *a, **k)

    def spy_exec(src, *a, **k):
        # sympy compiles its own monomial arithmetic with exec; that code is not from the input
        if isinstance(src, str) and not src.startswith("def monomial_"):
            evaluated.append(("exec", src[:80]))
        return real_exec(src, *a, **k)

    def spy_parse(src, *a, **k):
        evaluated.append(("parse_expr", str(src)[:80]))
        return real_parse(src, *a, **k)

    mp = pytest.MonkeyPatch()
    mp.setattr(builtins, "eval", spy_eval)
    mp.setattr(builtins, "exec", spy_exec)
    mp.setattr(sympy_parser, "parse_expr", spy_parse)
    try:
        out = []
        for case in data["cases"]:
            math_task.clear_caches()
            out.append((case, _score_case(case["gold"], case["pred"])))
    finally:
        mp.undo()
    return out, evaluated


def test_cases_file_records_its_source_and_licence():
    data = _load()
    src = data["source"]
    assert src["repository"] == "https://github.com/huggingface/Math-Verify"
    assert len(src["commit"]) == 40 and int(src["commit"], 16) >= 0
    assert set(src["files"]) == {"tests/test_all.py", "tests/test_boxed.py",
                                 "tests/test_numina_cases.py", "tests/test_open_thoughts.py"}
    assert "MIT License" in data["licence"]["notice"]
    assert "Permission is hereby granted" in data["licence"]["notice"]
    assert len(data["cases"]) >= 250
    assert {type(c["expected"]) for c in data["cases"]} == {bool}


def _report(rows):
    misses = collections.defaultdict(list)
    for case, ours in rows:
        if (ours >= 0.5) != case["expected"]:
            misses[case["source"].split("::")[-1]].append(
                f"line {case['line']}: expected {case['expected']}, scored {ours:g}; "
                f"gold {case['gold'][-60:]!r} pred {case['pred'][-60:]!r}")
    lines = [f"{kind}: {len(items)} miss(es)\n    " + "\n    ".join(items)
             for kind, items in sorted(misses.items())]
    return "\n".join(lines) or "no misses"


def test_agreement_with_math_verify_suite(outcomes):
    rows, _ = outcomes
    agree = [(ours >= 0.5) == case["expected"] for case, ours in rows]
    short = [a for a, (case, _) in zip(agree, rows) if len(case["gold"]) <= SHORT_GOLD_CHARS]
    overall, short_rate = sum(agree) / len(agree), sum(short) / len(short)
    print(f"\nmath-verify suite: {sum(agree)}/{len(agree)} = {overall:.1%} agree; "
          f"short golds {sum(short)}/{len(short)} = {short_rate:.1%}\n{_report(rows)}")
    assert overall >= MIN_AGREEMENT, _report(rows)
    assert short_rate >= MIN_AGREEMENT, _report(rows)


def test_no_false_positive_on_the_suites_false_cases(outcomes):
    rows, _ = outcomes
    false_rows = [(case, ours) for case, ours in rows if not case["expected"]]
    accepted = [(case, ours) for case, ours in false_rows if ours >= 0.5]
    assert len(false_rows) >= 30
    assert not accepted, _report(accepted)


def test_model_text_is_never_evaluated(outcomes):
    _, evaluated = outcomes
    assert evaluated == []
