"""The ``vtriune`` reward profile against V-Triune's own reward server.

``tests/data/vtriune_reward_cases.json`` holds (ground truth, response) pairs in Orsta's layout over
the eight tasks, plain and adversarial, each with the reward V-Triune's MIT code returned for it
(github.com/MiniMax-AI/One-RL-to-See-Them-All at 39bcf0d, run once through its ``/judge`` handler by
``scripts/vtriune_cases.py expect``; the file records the commit, the package versions and the
licence). Each row goes through ``convert_spec`` (the converter's ``vtriune`` profile) and is scored
in-process. The rows that still differ are listed below with their reasons (docs/vtriune.md too).
"""
import builtins
import json
from pathlib import Path

import pytest

from dualrpo_mcore.data.schema import TASKS
from dualrpo_mcore.data.vtriune import convert_spec
from dualrpo_mcore.verifiers.scoring import score_with_info

CASES_FILE = Path(__file__).resolve().parents[1] / "data" / "vtriune_reward_cases.json"
MIN_MATCH = 0.995
MIN_CASES = 300
TOL = 1e-6
KNOWN_DIFFERENCES = {
    "adv-math-13": "\\sum in a box: our parser refuses sums, integrals and limits (unbounded sympy work "
                   "on model text); theirs evaluates the sum to 12",
    "adv-det-24-1": "every ground-truth box above COCO's 1e10 area range leaves mAP at -1 and their "
                    "reward negative; verify() returns a reward in [0, 1]",
}


def _load():
    with open(CASES_FILE, encoding="utf-8") as f:
        return json.load(f)


def spec_of(case: dict) -> dict:
    """The spec our converter makes of the case's ``reward_model``, with what the loader adds."""
    rm = {"ground_truth": case["solution"], "verifier": case["verifier"], "accuracy_ratio": case["accuracy_ratio"],
          "format_ratio": case["format_ratio"], "verifier_parm": case["verifier_parm"]}
    spec = convert_spec(rm, case["task"], [], profile="vtriune")
    if case.get("image_hw"):  # the loader's with_image_hw, from the processed grid
        spec["params"]["image_hw"] = case["image_hw"]
    if case["iou_threshold"] != "dynamic":  # their DET_IOU_THRESHOLD environment variable
        t = case["iou_threshold"]
        spec["params"]["iou_threshold"] = t if t == "average" else float(t)
    return spec


@pytest.fixture(scope="module")
def outcomes():
    """``(case, our reward, status)`` per case, with every entry point that runs text as Python
    watched."""
    import sympy
    import sympy.parsing.sympy_parser as sympy_parser
    import sympy.physics.units  # noqa: F401  (its import sympifies constant names: not model text)

    data = _load()
    # lazy imports happen before the watch starts (namedtuple classes are made with eval)
    score_with_info({"verifier": "vtriune_math", "answer": "\\boxed{1}"}, "\\boxed{(x+1)^2, [1,2)}")
    with_map = next(c for c in data["cases"] if c["verifier_parm"].get("det_reward_ratio", {}).get("map"))
    score_with_info(spec_of(with_map), "<answer>[{'bbox_2d': [1, 1, 5, 5], 'label': 'cat'}]</answer>")
    evaluated = []
    real = builtins.eval, builtins.exec, sympy_parser.parse_expr, sympy.sympify

    def spy(name, fn, only=lambda src: True):
        def wrapped(src, *a, **k):
            if only(src):
                evaluated.append((name, str(src)[:80]))
            return fn(src, *a, **k)
        return wrapped

    mp = pytest.MonkeyPatch()
    mp.setattr(builtins, "eval", spy("eval", real[0]))
    # sympy compiles its own monomial arithmetic with exec; that code is not from the input
    mp.setattr(builtins, "exec",
               spy("exec", real[1], lambda s: isinstance(s, str) and not s.startswith("def monomial_")))
    mp.setattr(sympy_parser, "parse_expr", spy("parse_expr", real[2]))
    mp.setattr(sympy, "sympify", spy("sympify", real[3], lambda s: isinstance(s, str)))
    try:
        out = []
        for case in data["cases"]:
            reward, info = score_with_info(spec_of(case), case["response"], progress=case["step"] / case["total_steps"])
            out.append((case, reward, info["status"]))
    finally:
        mp.undo()
    return out, evaluated


def test_cases_file_records_its_source_and_licence():
    src = _load()["source"]
    assert src["repo"].endswith("MiniMax-AI/One-RL-to-See-Them-All") and src["commit"].startswith("39bcf0d")
    assert src["licence"].startswith("MIT License") and "MiniMax" in src["licence"]
    assert src["run_with"]["math-verify"] == "0.9.0"


def test_cases_cover_the_eight_tasks_and_their_two_verifiers():
    cases = _load()["cases"]
    assert len(cases) >= MIN_CASES
    assert {c["task"] for c in cases} == set(TASKS)
    assert {c["verifier"] for c in cases} == {"mathverify", "detection"}
    assert sum(c["id"].startswith("adv-") for c in cases) >= 100  # adversarial ones included
    expected = [c["expected"] for c in cases]
    assert 0.3 < sum(e > 0 for e in expected) / len(expected) < 0.9  # neither all right nor all wrong


def test_rewards_match_theirs(outcomes):
    out, _ = outcomes
    differ = {c["id"]: (c["note"], c["expected"], r) for c, r, _ in out if abs(r - c["expected"]) > TOL}
    assert (len(out) - len(differ)) / len(out) >= MIN_MATCH, differ
    assert set(differ) <= set(KNOWN_DIFFERENCES), {k: v for k, v in differ.items() if k not in KNOWN_DIFFERENCES}


def test_every_case_scores_without_error(outcomes):
    out, _ = outcomes
    assert [(c["id"], s) for c, _, s in out if s != "ok"] == []


def test_model_text_is_never_evaluated(outcomes):
    _, evaluated = outcomes
    assert evaluated == []


def test_issue_examples():
    """The issue's two worked numbers: 3 of 4 boxes found, and 45.2\\% against 45.2."""
    cases = {c["id"]: c for c in _load()["cases"]}
    three_of_four = cases["adv-det-issue-example"]
    assert three_of_four["expected"] == pytest.approx(0.5204545, abs=1e-6)
    r, _ = score_with_info(spec_of(three_of_four), three_of_four["response"], progress=0.6)
    assert r == pytest.approx(three_of_four["expected"], abs=TOL)
    spec = {"verifier": "vtriune_math", "answer": "45.2", "params": {"accuracy_ratio": 1.0, "format_ratio": 0.0}}
    assert score_with_info(spec, "\\boxed{45.2\\%}")[0] == 0.0
    assert score_with_info(spec, "\\boxed{45.2}")[0] == 1.0


def test_pool_workers_score_as_in_process(outcomes):
    """The sandboxed workers (imports done before their audit hook) give the in-process rewards."""
    from dualrpo_mcore.verifiers import VerifierPool

    out, _ = outcomes
    picked = out[::20] + [o for o in out if o[0]["verifier_parm"].get("det_reward_ratio", {}).get("map")][:3]
    with VerifierPool(num_workers=1, timeout_s=30) as pool:
        for case, reward, _ in picked:
            got = pool.verify_batch([spec_of(case)], [case["response"]], progress=case["step"] / case["total_steps"])[0]
            assert (got.status, got.reward) == ("ok", pytest.approx(reward, abs=1e-12)), case["id"]
