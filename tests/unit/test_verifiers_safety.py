"""score never raises, stays in [0, 1], never executes model output, and is bounded on 1 MB."""
import os
import uuid

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from dualrpo_mcore.verifiers.scoring import score, score_with_info

SPECS = [
    {"verifier": "math", "answer": r"\frac{1}{2}", "params": {"fallback": "full"}},
    {"verifier": "choice", "answer": "B", "params": {"options": ["x", "y", "z"]}},
    {"verifier": "numeric", "answer": 12.5},
    {"verifier": "counting", "answer": 7},
    {"verifier": "ocr", "answer": "hello world"},
    {"verifier": "grounding", "answer": [0, 0, 10, 10]},
    {"verifier": "detection", "answer": [{"bbox_2d": [0, 0, 10, 10], "label": "dog"}]},
    {"verifier": "format"},
    {"verifier": "format", "params": {"mode": "regex", "pattern": r"(a|b)*c"}},
    {"components": [{"verifier": "math", "answer": "3", "weight": 2},
                    {"verifier": "format", "weight": 1}]},
]

_ALPHABET = st.sampled_from(list("0123456789abcxyzAB ,.;:()[]{}<>/\\^_*+-=%$!'\"\n\t") +
                            ["\\boxed{", "\\frac", "<answer>", "</answer>", "<think>", "</think>",
                             "\\sqrt", "\\pi", "e", "sqrt(", "bbox_2d", "\u2212", "\x00"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_ALPHABET, max_size=40).map("".join))
def test_fuzz_structured_strings(text):
    for spec in SPECS:
        value, info = score_with_info(spec, text)
        assert isinstance(value, float) and 0.0 <= value <= 1.0
        assert info["status"] in ("ok", "unparsable", "error")


@settings(max_examples=40, deadline=None)
@given(st.text(max_size=200), st.floats(allow_nan=True, allow_infinity=True) | st.none())
def test_fuzz_arbitrary_text_and_progress(text, progress):
    for spec in SPECS:
        value = score(spec, text, progress=progress)
        assert 0.0 <= value <= 1.0


@pytest.mark.parametrize("spec", [None, 3, [], {"verifier": 5}, {"components": "x"},
                                  {"verifier": "math", "answer": float("nan")},
                                  {"verifier": "numeric", "answer": 1, "params": {"rel_tol": float("nan")}},
                                  {"verifier": "detection", "answer": [[0, 0, 1]]}])
def test_bad_specs_do_not_raise(spec):
    assert score(spec, "1") == 0.0
    assert score_with_info(spec, "1")[1]["status"] == "bad_spec"


@pytest.mark.parametrize("response", [None, b"\\boxed{1/2}", 12])
def test_non_string_responses(response):
    assert 0.0 <= score(SPECS[0], response) <= 1.0


def test_no_errors_on_ordinary_responses():
    """No verifier should reach its catch-all 'error' status on plausible outputs."""
    for resp in ["<think>x</think><answer>B</answer>", r"\boxed{0.5}", "[1, 2, 30, 40]", "seven"]:
        for spec in SPECS:
            assert score_with_info(spec, resp)[1]["status"] != "error", (spec, resp)


def test_code_in_responses_is_never_executed(tmp_path):
    marker = tmp_path / f"pwned_{uuid.uuid4().hex}"
    payloads = [
        f"__import__('os').system('touch {marker}')",
        f'\\boxed{{__import__("os").system("touch {marker}")}}',
        f"<answer>__import__('os').system('touch {marker}')</answer>",
        f"\\boxed{{eval(\"__import__('os').system('touch {marker}')\")}}",
        f"sqrt(__import__('os').system('touch {marker}'))",
        f"<answer>[{{'bbox_2d': __import__('os').system('touch {marker}')}}]</answer>",
        f"\\boxed{{\\text{{open('{marker}', 'w')}}}}",
        f"1e3; open('{marker}','w')",
    ]
    from dualrpo_mcore.verifiers.base import VERIFIERS

    assert set(VERIFIERS.names()) >= {"math", "choice", "numeric", "counting", "ocr",
                                      "grounding", "detection", "format"}
    for resp in payloads:
        for spec in SPECS:
            score(spec, resp)
        for fallback in ("none", "last_line", "full"):
            score({"verifier": "math", "answer": "0", "params": {"fallback": fallback}}, resp)
    assert not marker.exists() and not os.path.exists(str(marker))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.get("verifier", "components"))
def test_megabyte_responses_are_bounded(spec):
    """Adversarial 1 MB inputs finish (the test would hang otherwise); no time is asserted."""
    for resp in ["a" * 1_000_000, " " * 1_000_000 + "answer", "(" * 500_000 + ")" * 500_000,
                 "\\boxed{" * 100_000, "[1," * 300_000, "<answer>" * 100_000 + "1" * 100_000,
                 "1" * 1_000_000, "{" * 1_000_000]:
        assert 0.0 <= score(spec, resp) <= 1.0


@pytest.mark.parametrize("response", [
    r"\boxed{(x+1)^{100000}}",                       # symbolic expansion bomb
    r"\boxed{x^{70}}",
    r"\boxed{\binom{10^{10}}{5 \cdot 10^{9}}}",     # exact binomial of astronomic size
    r"\boxed{\binom{n}{2}}",
    r"\boxed{{10 \choose 5}}",
])
def test_expensive_math_is_refused_before_evaluation(response):
    # These hung sympy in-process for minutes before the guard learned them; the pool's timeout
    # is the backstop, the guard must be the first line.
    reward, info = score_with_info({"verifier": "math", "answer": "1/2"}, response)
    assert reward == 0.0 and info["status"] == "unparsable", info


def test_small_binomials_and_numeric_powers_still_evaluate():
    assert score({"verifier": "math", "answer": "120"}, r"\boxed{\binom{10}{3}}") == 1.0
    assert score({"verifier": "math", "answer": "1024"}, r"\boxed{2^{10}}") == 1.0
    assert score({"verifier": "math", "answer": "x^2+2x+1"}, r"\boxed{(x+1)^{2}}") == 1.0
