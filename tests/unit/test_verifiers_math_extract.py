"""Where the math verifier looks for an answer (``math_extract``), rule by rule."""
import pytest

from dualrpo_mcore.verifiers.math_extract import (
    box_group, environments, find_answers, plain_numbers, reads_as_math,
)


def _first(text):
    return next(iter(find_answers(text)), None)


def test_boxes_close_together_are_one_answer_and_far_ones_a_draft():
    assert box_group(r"\boxed{1}\boxed{2}") == ["1", "2"]
    assert box_group(r"so \boxed{(2, 2)} \quad \text{and} \quad \boxed{(6, 2)}.") == ["(2, 2)", "(6, 2)"]
    assert box_group(r"\boxed{3}" + " and a long reconsideration of the problem" * 3
                     + r" \boxed{4}") == ["4"]
    assert box_group(r"\boxed{2} ... \boxed{2}") == ["2"]  # a repeated box is one answer
    assert box_group(r"\boxed{\frac{1}{\sqrt{2}}}") == [r"\frac{1}{\sqrt{2}}"]
    assert box_group(r"\boxed{1} then \boxed{2") == ["1"]  # an unclosed box is no box
    assert box_group(r"\boxed 5.") == ["5."]
    assert box_group("no box here") is None


def test_final_answer_after_the_boxes_wins():
    found = _first(r"\boxed{255} then more. Final Answer: The final answer is $10,455$. I hope")
    assert found.parts == ("10,455",) and found.how == "final answer"


def test_anchors_pair_their_own_dollars():
    # a currency $ earlier in the text must not shift which $..$ is the answer
    text = "has $10,200 + $255 = $10,455. Final Answer: The final answer is $10,455$. I hope"
    assert _first(text).parts == ("10,455",)
    assert _first("Final Answer: The largest $n$ is 34.").parts == ("34",)
    assert _first("The answer is not 7, it is 8.").parts == ("8",)


def test_chains_make_one_multi_answer():
    assert _first("The answer is 1/2 or 3.").parts == ("1/2", "3")
    assert _first("so we get $1$, $2$ and $3$").parts == ("1", "2", "3")


def test_inline_math_does_not_span_lines_and_its_numbers_stay_inside():
    assert environments("Answer $ \n 9 \n $") == []
    assert plain_numbers("Answer $ \n 9 \n $") == []
    assert [it.text for it in plain_numbers("Soucis : 2,74 $ a..")] == ["2.74"]
    assert [it.text for it in plain_numbers("it is 1,000.99€ or 1 000")][-2:] == ["1000.99", "1000"]


def test_number_formats_in_prose():
    text = r"is 10,455 or 1,000,000 or 2,74 or 0,111 or 32,\! 349 or 14{,}916 or 1,000.99 or -3"
    assert [it.text for it in plain_numbers(text)] == [
        "10455", "1000000", "2.74", "0.111", "32349", "14916", "1000.99", "-3"]
    assert [it.text for it in plain_numbers("so 2/3 and (1/2) * (4/3).")] == ["2/3", "(1/2) * (4/3)"]
    assert [it.text for it in plain_numbers("we get 28 percent")] == ["28\\%"]


def test_numbers_are_not_read_from_code():
    assert plain_numbers("__import__('os').system('true') or 7") == []
    assert plain_numbers("eval('7')") == []
    assert not reads_as_math("print(7)")
    assert [it.text for it in plain_numbers("AZYUK2A and 3")] == ["3"]


def test_whole_span_only_when_it_reads_as_math():
    assert reads_as_math(r"x \in [-2, 7]") and reads_as_math("15 apples")
    assert reads_as_math(r"\text{Evelyn}") and reads_as_math("2 or 3")
    assert not reads_as_math("it costs 5") and not reads_as_math("$5$")


@pytest.mark.parametrize("text", [
    "1" + " " * 4096 + "2", "$" * 4096, "\\(" * 2048, "a" * 4096 + "(", "\\boxed{" * 600,
    "answer: " * 500, "final answer is 1 " * 200, "1 + (" * 800, "$x$ and " * 500,
])
def test_extraction_is_bounded_on_hostile_text(text):
    # no time is asserted (the benchmark measures it); the candidates stay few and short
    found = list(find_answers(text))
    assert len(found) <= 64 and all(len(p) <= 4096 for f in found for p in f.parts)
