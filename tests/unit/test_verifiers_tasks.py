"""choice, numeric, counting, ocr, format verifiers; component weighting; validate_spec."""
import pytest

from dualrpo_mcore.verifiers.scoring import score, score_with_info, validate_spec


def _lev(a, b):
    """Textbook dynamic-programming Levenshtein distance (independent of rapidfuzz)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


# ------------------------------------------------------------------------------------ choice

@pytest.mark.parametrize("resp,expected", [
    ("B", 1.0), ("(B)", 1.0), ("B.", 1.0), ("Answer: B", 1.0), ("The answer is (B).", 1.0),
    (r"\boxed{B}", 1.0), (r"\boxed{\text{B}}", 1.0), ("<answer>B</answer>", 1.0),
    ("B. Paris", 1.0), ("C", 0.0), ("The answer is (C).", 0.0), ("<answer>A</answer>", 0.0),
    ("I considered (A) but the answer is B", 1.0),
])
def test_choice_by_letter(resp, expected):
    assert score({"verifier": "choice", "answer": "B"}, resp) == expected


def test_choice_by_text_and_options():
    opts = ["London", "Paris", "Berlin"]
    spec = {"verifier": "choice", "answer": "Paris", "params": {"options": opts}}
    assert score(spec, "<answer>Paris</answer>") == 1.0
    assert score(spec, "<answer>paris.</answer>") == 1.0
    assert score(spec, "B") == 1.0
    assert score(spec, "<answer>Berlin</answer>") == 0.0
    assert score(spec, "D") == 0.0 or score_with_info(spec, "D")[1]["status"] == "unparsable"
    dict_spec = {"verifier": "choice", "answer": "(c)", "params": {"options": {"a": "x", "b": "y", "c": "z"}}}
    assert score(dict_spec, "the answer is z") == 1.0
    assert score(dict_spec, "C") == 1.0


@pytest.mark.parametrize("resp", ["", "   ", "the answer is a dog", "\x00\x01", "((((", "Answer:"])
def test_choice_malformed(resp):
    assert score({"verifier": "choice", "answer": "B"}, resp) == 0.0


# ----------------------------------------------------------------------------------- numeric

def test_numeric_tolerance_edges():
    spec = {"verifier": "numeric", "answer": 100, "params": {"rel_tol": 0.05}}
    assert score(spec, "105") == 1.0
    assert score(spec, "95") == 1.0
    assert score(spec, "105.01") == 0.0
    assert score(spec, "94.99") == 0.0
    exact = {"verifier": "numeric", "answer": 2.5, "params": {"rel_tol": 0.0}}
    assert score(exact, "2.5") == 1.0 and score(exact, "2.5000001") == 0.0
    absolute = {"verifier": "numeric", "answer": 0, "params": {"rel_tol": 0.0, "abs_tol": 0.1}}
    assert score(absolute, "0.1") == 1.0 and score(absolute, "-0.11") == 0.0


def test_numeric_formats_and_percent():
    assert score({"verifier": "numeric", "answer": "1,234.5"}, r"\boxed{1234.5}") == 1.0
    assert score({"verifier": "numeric", "answer": 1234.5}, "about 1,234.5 units") == 1.0
    assert score({"verifier": "numeric", "answer": 0.45}, "45%") == 1.0
    assert score({"verifier": "numeric", "answer": 45}, "45%") == 1.0
    assert score({"verifier": "numeric", "answer": 0.45, "params": {"percent": "ignore"}}, "45%") == 0.0
    assert score({"verifier": "numeric", "answer": 45, "params": {"percent": "divide"}}, "45%") == 0.0
    assert score({"verifier": "numeric", "answer": "3/4"}, r"\boxed{\frac{3}{4}}") == 1.0
    assert score({"verifier": "numeric", "answer": -2.5}, "−2.5") == 1.0
    assert score({"verifier": "numeric", "answer": 1500}, "1.5e3") == 1.0


@pytest.mark.parametrize("resp", ["", "no numbers here", r"\boxed{}", "1/0", "nan", "inf"])
def test_numeric_malformed(resp):
    assert score({"verifier": "numeric", "answer": 3, "params": {"rel_tol": 0.0}}, resp) == 0.0


# ---------------------------------------------------------------------------------- counting

@pytest.mark.parametrize("resp,answer", [
    ("7", 7), ("seven", 7), ("There are Seven birds.", 7), ("twenty-one", 21), ("twenty one", 21),
    ("one hundred", 100), ("a hundred", 100), ("one hundred and five", 105), ("ninety-nine", 99),
    ("a dozen", 12), ("I count 3 cats and 4 dogs, so 7 animals", 7), (r"\boxed{12}", 12),
    ("1,024", 1024), ("5.0", 5), ("<answer>zero</answer>", 0), ("thirteen", 13),
])
def test_counting_right(resp, answer):
    assert score({"verifier": "counting", "answer": answer}, resp) == 1.0


@pytest.mark.parametrize("resp", ["8", "eight", "seventy", "", "many", "7.5"])
def test_counting_wrong_or_malformed(resp):
    assert score({"verifier": "counting", "answer": 7}, resp) == 0.0


# --------------------------------------------------------------------------------------- ocr

@pytest.mark.parametrize("ref,pred", [
    ("kitten", "sitting"), ("Hello World", "hello  world!"), ("STOP", "STOP"), ("abc", ""),
    ("The quick brown fox", "The quack brown fax"), ("", ""),
])
def test_ocr_similarity_vs_reference(ref, pred):
    def norm(s):
        s = "".join(" " if not (c.isalnum() or c.isspace()) else c for c in s.casefold())
        return " ".join(s.split())
    a, b = norm(ref), norm(pred)
    expected = 1.0 if not a and not b else 1.0 - _lev(a, b) / max(len(a), len(b))
    got = score({"verifier": "ocr", "answer": ref}, pred) if pred else \
        score_with_info({"verifier": "ocr", "answer": ref}, pred)[0]
    if pred:
        assert got == pytest.approx(expected)
    else:
        assert got == 0.0  # an empty response has no answer at all


def test_ocr_exact_and_options():
    assert score({"verifier": "ocr", "answer": "Hello", "params": {"mode": "exact"}}, "hello.") == 1.0
    strict = {"verifier": "ocr", "answer": "Hello", "params": {"mode": "exact", "case": False}}
    assert score(strict, "hello") == 0.0
    assert score({"verifier": "ocr", "answer": ["colour", "color"], "params": {"mode": "exact"}}, "color") == 1.0
    assert score({"verifier": "ocr", "answer": "abc"}, "<answer>abd</answer>") == pytest.approx(2 / 3)
    assert score({"verifier": "ocr", "answer": "x" * 10}, "x" * 1_000_000) == pytest.approx(10 / 2000)


# ------------------------------------------------------------------------------------ format

@pytest.mark.parametrize("resp,expected", [
    ("<think>reason</think><answer>42</answer>", 1.0),
    ("  <think>reason</think>\n\n<answer>42</answer>\n", 1.0),
    ("<think>reason</think>junk<answer>42</answer>", 0.0),
    ("<think></think><answer>42</answer>", 0.0),
    ("<think>a</think><answer>1</answer><answer>2</answer>", 0.0),
    ("<answer>42</answer><think>reason</think>", 0.0),
    ("<think>reason</think><answer>42</answer> trailing", 0.0),
    ("", 0.0), ("<think>", 0.0),
])
def test_format_think_answer(resp, expected):
    assert score({"verifier": "format"}, resp) == expected


def test_format_regex_and_answer_only():
    spec = {"verifier": "format", "params": {"mode": "regex", "pattern": r"Answer: [A-D]"}}
    assert score(spec, "Answer: C") == 1.0 and score(spec, "Answer: E") == 0.0
    search = {"verifier": "format", "params": {"mode": "regex", "pattern": r"\d+", "match": "search"}}
    assert score(search, "abc 12 def") == 1.0
    capped = {"verifier": "format", "params": {"mode": "regex", "pattern": "a*", "max_chars": 10}}
    assert score(capped, "a" * 11) == 0.0 and score(capped, "a" * 10) == 1.0
    assert score({"verifier": "format", "params": {"mode": "answer_only"}}, "<answer>x</answer>") == 1.0


# -------------------------------------------------------------------------------- components

def test_component_weighting():
    spec = {"components": [
        {"verifier": "counting", "answer": 3, "weight": 3},
        {"verifier": "format", "weight": 1},
    ]}
    assert score(spec, "3") == pytest.approx(0.75)
    assert score(spec, "<think>x</think><answer>3</answer>") == 1.0
    assert score(spec, "<think>x</think><answer>4</answer>") == pytest.approx(0.25)
    zero_w = {"components": [{"verifier": "counting", "answer": 3, "weight": 0},
                             {"verifier": "format", "weight": 2}]}
    assert score(zero_w, "3") == 0.0
    reward, info = score_with_info(spec, "3")
    assert [c["reward"] for c in info["components"]] == [1.0, 0.0]


# ----------------------------------------------------------------------------- validate_spec

@pytest.mark.parametrize("spec,field", [
    ({"verifier": "nope", "answer": 1}, "verifier"),
    ({"answer": 1}, "verifier"),
    ({"verifier": "math"}, "answer"),
    ({"verifier": "math", "answer": None}, "answer"),
    ({"verifier": "numeric", "answer": 1, "params": {"rel_tol": -1}}, "params.rel_tol"),
    ({"verifier": "numeric", "answer": 1, "params": {"relto": 1}}, "params.relto"),
    ({"verifier": "numeric", "answer": "abc"}, "answer"),
    ({"verifier": "numeric", "answer": 1, "params": []}, "params"),
    ({"verifier": "choice", "answer": "Z", "params": {"options": ["a", "b"]}}, "answer"),
    ({"verifier": "grounding", "answer": [0, 0, -1, 5]}, "answer"),
    ({"verifier": "grounding", "answer": [0, 0, 1, 1], "params": {"coords": "norm1000",
                                                                  "answer_coords": "abs"}}, "params.image_size"),
    ({"verifier": "detection", "answer": [[0, 0, 1, 1], [3, 3, 1, 1]]}, "answer[1]"),
    ({"verifier": "detection", "answer": [], "params": {"schedule": [[0.5, 0.9], [0.2, 0.9]]}}, "params.schedule"),
    ({"verifier": "format", "params": {"mode": "regex", "pattern": "("}}, "params.pattern"),
    ({"verifier": "ocr", "answer": 5}, "answer"),
    ({"components": []}, "components"),
    ({"components": [{"verifier": "format", "weight": -1}]}, "components[0].weight"),
    ({"components": [{"verifier": "format", "weight": 0}]}, "weight"),
    ({"components": [{"verifier": "format"}, {"verifier": "math"}]}, "components[1].answer"),
    ({"components": [{"verifier": "numeric", "answer": 1, "params": {"abs_tol": "x"}}]},
     "components[0].params.abs_tol"),
    ("not a dict", "spec"),
])
def test_validate_spec_names_the_field(spec, field):
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        validate_spec(spec)
    reward, info = score_with_info(spec, "anything")
    assert reward == 0.0 and info["status"] == "bad_spec"


def test_validate_spec_accepts_good_specs():
    for spec in [{"verifier": "math", "answer": "1/2"}, {"verifier": "format"},
                 {"verifier": "detection", "answer": [{"bbox_2d": [0, 0, 1, 1], "label": "a"}]},
                 {"components": [{"verifier": "format", "weight": 0.1},
                                 {"verifier": "counting", "answer": 2, "weight": 0.9}]}]:
        validate_spec(spec)
