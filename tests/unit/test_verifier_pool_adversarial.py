"""The real scorers behind the sandbox: 1,000 hostile responses, and the ``verify`` front door.

The per-sample bound asserted here (budget + 0.5 s) is the one the pool enforces by killing the
worker; it is measured per sample inside the pool, never as the wall-clock of the batch, and no
test here asserts speed.
"""
from __future__ import annotations

import math
import time
import uuid

import pytest

import dualrpo_mcore.verifiers as verifiers
from dualrpo_mcore.bench.verifiers import TASKS, mixed_batch
from dualrpo_mcore.verifiers import VerifierPool, verify
from dualrpo_mcore.verifiers.sandbox.adversarial import FAMILIES, adversarial_corpus, markers_left
from dualrpo_mcore.verifiers.sandbox.pool import STATUSES

BUDGET = 2.0
SLACK = 0.5
N = 1000


def _verifier_names(spec: dict) -> set:
    if "components" in spec:
        return {c["verifier"] for c in spec["components"]}
    return {spec["verifier"]}


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(num_workers=2, timeout_s=BUDGET) as p:
        p.wait_ready(120)
        yield p


@pytest.fixture(scope="module")
def adversarial_run(pool):
    token = uuid.uuid4().hex
    cases = adversarial_corpus(N, token=token)
    results = pool.verify_batch([c.spec for c in cases], [c.response for c in cases])
    return token, cases, results


def test_corpus_covers_every_verifier_and_family(adversarial_run):
    _, cases, _ = adversarial_run
    assert len(cases) == N
    assert set().union(*(_verifier_names(c.spec) for c in cases)) >= set(TASKS)
    assert {c.family for c in cases} == set(FAMILIES)
    for family in FAMILIES:  # every family meets every one of the eight verifiers
        met = set().union(*(_verifier_names(c.spec) for c in cases if c.family == family))
        assert met >= set(TASKS), (family, set(TASKS) - met)


def test_every_reward_is_finite_in_unit_interval(adversarial_run):
    _, _, results = adversarial_run
    assert len(results) == N
    for r in results:
        assert isinstance(r.reward, float) and math.isfinite(r.reward) and 0.0 <= r.reward <= 1.0
        assert r.status in STATUSES


def test_no_sample_outlives_its_budget(adversarial_run):
    _, cases, results = adversarial_run
    slow = [(r.elapsed_s, c.family, c.response[:60]) for c, r in zip(cases, results)
            if r.elapsed_s > BUDGET + SLACK]
    assert not slow, f"samples past the enforced bound: {slow[:5]}"
    assert all(r.reward == 0.0 for r in results if r.status in ("timeout", "crash"))


def test_code_execution_attempts_leave_no_trace(adversarial_run):
    token, cases, _ = adversarial_run
    assert any(c.family == "code" for c in cases)
    assert markers_left(token) == []


def test_pool_matches_in_process_scoring_on_realistic_samples(pool):
    from dualrpo_mcore.verifiers.scoring import score_with_info

    samples = mixed_batch(64, seed=3)
    results = pool.verify_batch([s for s, _ in samples], [r for _, r in samples], progress=0.5)
    expected = [score_with_info(s, r, progress=0.5) for s, r in samples]
    assert [(r.reward, r.status) for r in results] == [(v, i["status"]) for v, i in expected]
    assert 0 < sum(r.reward for r in results) < len(results)  # both right and wrong answers


@pytest.fixture(scope="module")
def fresh_default_pool():
    # The first front-door call below then includes the pool's cold start: the worst case
    # for the budget. One cold start serves both front-door tests.
    verifiers.shutdown_default_pool()
    yield
    verifiers.shutdown_default_pool()


def test_verify_front_door_bounds_a_bomb(fresh_default_pool):
    spec = {"verifier": "math", "answer": "\\frac{1}{2}"}
    start = time.monotonic()
    reward = verify(spec, "\\boxed{\\binom{10^{10}}{5 \\cdot 10^{9}}}", timeout_s=BUDGET)
    took = time.monotonic() - start
    assert isinstance(reward, float) and 0.0 <= reward <= 1.0
    assert took <= BUDGET + SLACK
    # the pool survives the kill and still scores normal answers
    assert verify(spec, "so \\boxed{0.5}", timeout_s=30) == 1.0


def test_verify_never_raises_for_odd_input(fresh_default_pool):
    spec = {"verifier": "math", "answer": "2"}
    for response in ["", "\ud800", "\x00" * 10, b"\xff\xfe", None, 3.5, "{" * 5000]:
        assert 0.0 <= verify(spec, response, timeout_s=10) <= 1.0
    assert verify({"verifier": "no-such-verifier", "answer": 1}, "1", timeout_s=10) == 0.0
    assert verify("not a spec", "1", timeout_s=10) == 0.0
