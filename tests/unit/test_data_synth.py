"""Synthetic eight-task set: ground truth verifies, perturbed answers do not, determinism."""
import hashlib
import random
import re

import pytest

from dualrpo_mcore.data import synth
from dualrpo_mcore.data.schema import TASKS, validate_row
from dualrpo_mcore.verifiers.scoring import score

N_PER_TASK = 200


def _as_model(answer_text: str, style: str) -> str:
    """How a model might write the answer: think/answer tags or a boxed final line."""
    if style == "tags":
        return f"<think>looking at the image</think><answer>{answer_text}</answer>"
    return f"Let me look at the image. The answer is \\boxed{{{answer_text}}}"


def _shift(box, dx, dy):
    return [box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy]


def _perturb(s, rng: random.Random) -> str:
    """A wrong answer built from the ground truth, independently of the generator's code."""
    spec = s.reward
    ans = spec["answer"]
    if s.task == "math":
        return str(float(ans) + rng.choice([-2, -1, 1, 3])).rstrip("0").rstrip(".")
    if s.task in ("puzzle", "science"):
        letters = [chr(65 + i) for i in range(len(spec["params"]["options"]))]
        return rng.choice([c for c in letters if c != ans])
    if s.task == "chart":
        return str(ans + rng.choice([-10, -5, 5, 10]))
    if s.task == "counting":
        return str(ans + rng.choice([1, 2]) if ans < 2 else ans + rng.choice([-1, 1]))
    if s.task == "ocr":
        words = ans.split()
        k = rng.randrange(len(words))
        words[k] = "zzzz" + words[k][::-1]
        return " ".join(words)
    if s.task == "grounding":  # moved by its own size: IoU 0
        w = ans[2] - ans[0] + 1
        return str(_shift(ans, w if ans[2] + w < 112 else -w, 0))
    if s.task == "detection":  # every box moved off itself by its own width
        return str([_shift(b, (b[2] - b[0] + 1) * (1 if b[2] + b[2] - b[0] + 1 < 112 else -1), 0)
                    for b in ans])
    raise AssertionError(s.task)


@pytest.mark.parametrize("task", TASKS)
def test_ground_truth_verifies_and_perturbed_fails(task):
    rng = random.Random(task)
    levels = set()
    for i in range(N_PER_TASK):
        s = synth.generate(task, i, seed=7)
        levels.add(s.difficulty)
        assert s.task == task
        for style in ("tags", "boxed"):
            r = score(s.reward, _as_model(s.answer_text, style))
            assert r == pytest.approx(1.0), (task, i, style, s.reward, s.answer_text)
        assert score(s.reward, s.response()) == pytest.approx(1.0)
        wrong = _perturb(s, rng)
        r_wrong = score(s.reward, _as_model(wrong, "tags"))
        # IoU / edit-distance tasks give partial credit; "wrong" means clearly below full
        limit = 0.75 if task == "ocr" else 0.0
        assert r_wrong <= limit, (task, i, s.reward, wrong, r_wrong)
        if task == "detection" and len(s.reward["answer"]) > 1:  # a missed box costs reward
            assert score(s.reward, _as_model(str(s.reward["answer"][:-1]), "tags")) < 0.9
    assert levels == {1, 2, 3}


@pytest.mark.parametrize("task", TASKS)
def test_rows_follow_schema(task):
    for i in range(6):
        row = synth.to_row(synth.generate(task, i), index=i, seed=0, split="train")
        out = validate_row(row, file="mem", row=i)
        assert out.task == task and len(out.images) == 1
        assert out.data_source.startswith(f"synth/{task}")
        assert re.search(r"<answer>", row["messages"][0]["content"])


def _digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a, b, c = (str(tmp_path / f"{n}.parquet") for n in "abc")
    synth.write_split(a, 4, seed=3, split="train")
    synth.write_split(b, 4, seed=3, split="train")
    synth.write_split(c, 4, seed=4, split="train")
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_train_and_heldout_differ():
    same = sum(synth.generate(t, i, split="train").question == synth.generate(t, i, split="heldout").question
               and synth.generate(t, i, split="train").answer_text == synth.generate(t, i, split="heldout").answer_text
               for t in ("chart", "detection", "ocr") for i in range(20))
    assert same < 10


def test_cli_synth_writes_splits_and_model_files(tmp_path):
    import pyarrow.parquet as pq

    from dualrpo_mcore.cli import main

    out = tmp_path / "synth"
    assert main(["data", "synth", "--out", str(out), "--num-per-task", "3", "--seed", "1",
                 "--no-tokenizer"]) == 0
    assert pq.read_table(out / "train.parquet").num_rows == 3 * len(TASKS)
    assert pq.read_table(out / "heldout.parquet").num_rows == len(TASKS)
