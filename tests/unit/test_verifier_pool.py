"""Verifier-pool mechanics, driven by the misbehaving scorers in ``_pool_scorers.py``.

Time assertions here are *bounds the pool itself enforces* (a timed-out sample is cut at its
budget), never speed claims.
"""
from __future__ import annotations

import os
import threading
import time
import uuid

import pytest

from dualrpo_mcore.verifiers.sandbox.pool import STATUSES, VerifierPool, VerifierPoolError

HERE = os.path.dirname(os.path.abspath(__file__))
BUDGET = 1.0
SLACK = 0.5


def make_pool(**kw) -> VerifierPool:
    kw.setdefault("num_workers", 2)
    kw.setdefault("timeout_s", BUDGET)
    kw.setdefault("scorer", "_pool_scorers:behave")
    kw.setdefault("pythonpath", [HERE])
    return VerifierPool(**kw)


def echo(answer: str) -> dict:
    return {"verifier": "echo", "answer": answer}


def children_of(pid: int) -> list[int]:
    """Child pids of ``pid`` from /proc (psutil is not a dependency), zombies included."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid:
            out.append(int(entry))
    return out


def test_results_keep_input_order_and_rewards():
    with make_pool() as pool:
        specs = [echo(str(i)) for i in range(60)]
        responses = [str(i) if i % 3 else "wrong" for i in range(60)]
        results = pool.verify_batch(specs, responses)
    assert [r.reward for r in results] == [0.0 if i % 3 == 0 else 1.0 for i in range(60)]
    assert all(r.status == "ok" for r in results)
    assert pool.verify_batch.__self__ is pool  # noqa: PLC2801 (bound method sanity)


def test_empty_batch_and_length_mismatch():
    with make_pool(num_workers=1, spares=0) as pool:
        assert pool.verify_batch([], []) == []
        with pytest.raises(ValueError, match="2 specs but 1 responses"):
            pool.verify_batch([echo("a"), echo("b")], ["a"])


@pytest.mark.parametrize("behaviour", ["spin", "bigint", "sleep"])
def test_timeout_kills_and_replaces_worker(behaviour):
    with make_pool() as pool:
        pool.wait_ready(30)
        before = set(pool.worker_pids())
        specs = [echo("a"), {"verifier": behaviour, "answer": 60}, echo("b"), echo("c")]
        results = pool.verify_batch(specs, ["a", "x", "b", "zzz"])
        after = set(pool.worker_pids())
        stats = pool.stats()
    bad = results[1]
    assert (bad.reward, bad.status) == (0.0, "timeout")
    assert BUDGET <= bad.elapsed_s <= BUDGET + SLACK
    assert [r.reward for r in results] == [1.0, 0.0, 1.0, 0.0]
    assert [r.status for r in results] == ["ok", "timeout", "ok", "ok"]
    assert before - after, "the timed-out worker must be gone"
    assert stats["status/timeout"] == 1 and stats["workers_replaced"] == 1


@pytest.mark.parametrize("behaviour,detail", [
    ("segfault", "SIGSEGV"), ("memory", "MemoryError"), ("exit", "EOF")])
def test_crash_is_contained(behaviour, detail):
    with make_pool() as pool:
        specs = [echo(str(i)) for i in range(10)]
        specs[4] = {"verifier": behaviour, "answer": 0}
        results = pool.verify_batch(specs, [str(i) for i in range(10)])
        # the pool is whole again: a second batch runs on the replacement worker(s)
        again = pool.verify_batch([echo("z")] * 6, ["z"] * 6)
        stats = pool.stats()
    assert (results[4].reward, results[4].status) == (0.0, "crash")
    assert detail in results[4].info["error"]
    assert [r.reward for i, r in enumerate(results) if i != 4] == [1.0] * 9
    assert all(r.reward == 1.0 for r in again)
    assert stats["status/crash"] == 1 and stats["workers_replaced"] == 1


def test_many_crashes_in_one_batch_still_complete():
    with make_pool(num_workers=2, spares=1) as pool:
        kinds = ["segfault", "exit", "memory", "spin"] * 3
        specs = [{"verifier": k, "answer": 0} for k in kinds] + [echo("ok")] * 4
        results = pool.verify_batch(specs, ["ok"] * len(specs))
    assert [r.status for r in results[:12]] == ["crash", "crash", "crash", "timeout"] * 3
    assert all(r.reward == 1.0 for r in results[12:])
    assert max(r.elapsed_s for r in results) <= BUDGET + SLACK


def test_scorer_misbehaviour_becomes_a_status():
    with make_pool() as pool:
        specs = [{"verifier": v, "answer": 0} for v in ("raise", "nan", "big", "bad_spec", "print")]
        results = pool.verify_batch(specs + [echo("a")], ["a"] * 6)
    assert [(r.reward, r.status) for r in results] == [
        (0.0, "error"), (0.0, "error"), (1.0, "ok"), (0.0, "bad_spec"), (1.0, "ok"), (1.0, "ok")]
    assert "scorer bug" in results[0].info["error"]


def test_sandbox_refuses_writes_and_processes():
    token = uuid.uuid4().hex
    markers = [f"/tmp/dualrpo_pwned_{token}_{i}" for i in range(2)]
    with make_pool(num_workers=1) as pool:
        results = pool.verify_batch([{"verifier": "write_file", "answer": markers[0]},
                                     {"verifier": "shell", "answer": markers[1]}], ["", ""])
    assert [r.status for r in results] == ["error", "error"]
    assert all("verifier sandbox" in r.info["error"] for r in results)
    assert not any(os.path.exists(m) for m in markers)


def test_worker_hardening_is_in_place():
    with make_pool(num_workers=1, max_memory_mb=1536) as pool:
        (res,) = pool.verify_batch([{"verifier": "introspect"}], [""])
    info = res.info
    assert res.status == "ok", info
    assert info["as_mb"] == 1536 and info["fsize"] == 0 and info["core"] == 0
    assert info["stdout_is_stderr"] and info["fd1_is_fd2"] and info["sigxfsz_ignored"]
    assert info["cwd"] != os.getcwd() and info["cwd_entries"] == 0
    assert not os.path.exists(info["cwd"]), "the worker's temp dir is removed with it"
    assert "HOME" in info["env"].split(",") and "PATH" in info["env"].split(",")
    leaked = set(info["env"].split(",")) - {
        "PATH", "LANG", "LC_ALL", "HOME", "TMPDIR", "PYTHONPATH", "PYTHONDONTWRITEBYTECODE",
        "PYTHONNOUSERSITE", "PYTHONHASHSEED", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
        "MKL_NUM_THREADS"}
    assert not leaked, f"parent environment leaked into the worker: {leaked}"
    assert not info["torch_loaded"]


def test_odd_inputs_never_raise():
    unserialisable = {"verifier": "echo", "answer": object()}
    with make_pool(num_workers=1) as pool:
        results = pool.verify_batch(
            [unserialisable, echo("a"), echo(""), echo("None"), echo("\ud800x")],
            ["a", b"a", None, None, "\ud800x"])
    assert results[0].status == "bad_spec" and "JSON" in results[0].info["error"]
    assert [r.reward for r in results[1:]] == [1.0, 1.0, 0.0, 1.0]  # lone surrogate survives JSON


def test_long_responses_keep_their_tail():
    with make_pool(num_workers=1, max_response_chars=1000) as pool:
        results = pool.verify_batch([{"verifier": "echo"}] * 2, ["x" * 5000, "y" * 10], progress="len")
        stats = pool.stats()
    assert results[0].info["len"] == 1000 and results[0].info["truncated"] == 5000
    assert results[1].info["len"] == 10 and "truncated" not in results[1].info
    assert stats["truncated"] == 1


def test_stats_count_every_status():
    with make_pool() as pool:
        specs = [echo("a"), echo("a"), {"verifier": "raise"}, {"verifier": "spin"},
                 {"verifier": "exit"}, {"verifier": "bad_spec"}]
        pool.verify_batch(specs, ["a", "b", "", "", "", ""])
        stats = pool.stats()
    assert set(f"status/{s}" for s in STATUSES) <= set(stats)
    assert stats["samples"] == 6
    assert (stats["status/ok"], stats["status/error"], stats["status/timeout"],
            stats["status/crash"], stats["status/bad_spec"]) == (2, 1, 1, 1, 1)
    assert BUDGET <= stats["elapsed_s_max"] <= BUDGET + SLACK


def test_total_timeout_bounds_the_whole_call():
    with make_pool(num_workers=1, spares=0, timeout_s=30) as pool:
        start = time.monotonic()
        results = pool.verify_batch([{"verifier": "sleep", "answer": 20}, echo("a")], ["", "a"],
                                    total_timeout_s=0.8)
        took = time.monotonic() - start
    assert [r.status for r in results] == ["timeout", "timeout"]
    assert took <= 0.8 + SLACK


def test_concurrent_callers_share_the_pool():
    out: dict[int, list] = {}
    with make_pool() as pool:
        def caller(k):
            out[k] = pool.verify_batch([echo(f"{k}-{i}") for i in range(20)],
                                       [f"{k}-{i}" for i in range(20)])
        threads = [threading.Thread(target=caller, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert sorted(out) == [0, 1, 2, 3]
    assert all(r.reward == 1.0 for rs in out.values() for r in rs)


def test_workers_are_recycled():
    with make_pool(num_workers=1, spares=1, max_samples_per_worker=3) as pool:
        results = pool.verify_batch([echo("a")] * 10, ["a"] * 10)
        stats = pool.stats()
    assert all(r.reward == 1.0 for r in results)
    assert stats["recycled"] >= 3


def test_unstartable_scorer_raises_a_clear_error():
    with make_pool(num_workers=1, spares=0, scorer="_pool_scorers:no_such_function") as pool:
        with pytest.raises(VerifierPoolError, match="no_such_function"):
            pool.verify_batch([echo("a")], ["a"])


def test_close_leaves_no_child_processes():
    pool = make_pool(num_workers=2, spares=1)
    pool.wait_ready(30)
    pool.verify_batch([{"verifier": "spin"}, echo("a")], ["", "a"])  # one kill + respawn
    deadline = time.monotonic() + 10
    while len(pool.worker_pids()) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)  # the replacement is spawned by the dispatcher right after the kill
    pids = pool.worker_pids()
    assert len(pids) == 3
    pool.close()
    pool.close()  # idempotent
    alive = set(children_of(os.getpid())) & set(pids)
    assert not alive, f"workers left behind (alive or zombie): {alive}"
    for pid in pids:
        with pytest.raises(ChildProcessError):  # already reaped: no zombie
            os.waitpid(pid, os.WNOHANG)
    with pytest.raises(VerifierPoolError, match="closed"):
        pool.verify_batch([echo("a")], ["a"])


def test_imports_option_loads_modules_in_the_worker():
    with make_pool(num_workers=1, spares=0, imports=["_pool_plugin"]) as pool:
        (res,) = pool.verify_batch([{"verifier": "imported"}], [""])
    assert (res.reward, res.info["imported"]) == (1.0, "_pool_plugin")


def test_numpy_values_travel_as_plain_json():
    np = pytest.importorskip("numpy", reason="numpy is optional for the pool itself")
    with make_pool(num_workers=1, spares=0) as pool:
        results = pool.verify_batch([{"verifier": "echo", "answer": np.str_("3")},
                                     {"verifier": "echo", "answer": np.array([1, 2]), "x": np.int64(1)}],
                                    ["3", "[1, 2]"], progress=np.float32(0.5))
    assert [r.status for r in results] == ["ok", "ok"]
    assert results[0].reward == 1.0


def test_workers_find_the_package_from_a_source_checkout():
    """The workers' PYTHONPATH starts at the directory that holds ``dualrpo_mcore`` (a checkout without an
    install must still import the scorers there); moving the pool into ``sandbox/`` once pointed it at the
    package itself."""
    from dualrpo_mcore.verifiers.sandbox import pool

    assert os.path.isfile(os.path.join(pool._PACKAGE_ROOT, "dualrpo_mcore", "verifiers", "sandbox", "pool.py"))
