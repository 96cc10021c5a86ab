"""Kill anywhere, lose nothing: ``dualrpo train`` killed on purpose (SIGKILL from the fault hook,
``DUALRPO_FAULT=<point>@<step>``) at each fault point, at TP=1 (one process) and TP=2 (2 processes),
then resumed with ``--resume auto``. Every step 1..N must then have exactly one record in
metrics.jsonl and in TensorBoard, bitwise equal to an uninterrupted run's (one reference run per
setting). Also: a failed write on one rank (injected EIO), unreadable checkpoints (fallback under
``auto``, one line for an explicit path), checkpoints of another layout, and a real full disk (a small
tmpfs, where this test may mount one).

Launches go through :mod:`helpers.killable` (ranks forked from a fork server that imported everything once:
~3 s a launch instead of ~15 s under torchrun). Tiny everything: 3 steps, G=2, 2 prompts, 8 new tokens,
checkpoints at steps 2 and 3.
"""
import json
import os
import shutil
import subprocess

import pytest

from helpers.killable import launch

STEPS = 3
# setting -> (tp, processes, held-out eval: its step-0 record must also survive a resume from nothing)
SETTINGS = {"tp1": (1, 1, True), "tp2": (2, 2, False)}
# (point, step): checkpoints are written at steps 2 and 3, so a kill at step 3 resumes from step 2
# and one at step 1 or 2 (before checkpoint 2 is published) from nothing.
KILLS = {
    "tp1": [("after_rollout", 3), ("in_update", 3), ("after_sync", 2), ("after_log", 1), ("mid_checkpoint", 2),
            ("after_checkpoint", 2)],
    "tp2": [("after_rollout", 2), ("in_update", 3), ("after_sync", 3), ("after_log", 3), ("mid_checkpoint", 3),
            ("after_checkpoint", 2)],
}
CKPT_STEPS = (2, 3)
# Wall-clock fields differ between any two runs; everything else must be bitwise equal.
VOLATILE = ("time",)


def train_argv(data, run_dir, setting, *extra):
    tp, _, with_eval = SETTINGS[setting]
    sets = ["rollout.group_size=2", "schedule.prompts_per_step=2", "rollout.sampling.max_new_tokens=8",
            "actor.optim.lr=0.001", "checkpoint.every=2", "checkpoint.keep_last=10",
            # A generous budget: a verifier timeout under load would change a reward, not the code path.
            "verifier.workers=1", "verifier.timeout_s=30",
            f"eval.every={2 if with_eval else 0}", "eval.max_samples=2"]
    argv = ["train", "--recipe", "tiny_cpu", "--data", data, "--out", run_dir, "--steps", str(STEPS), "--tp", str(tp),
            "--reward-mode", "dualrpo", "--no-progress"]
    for kv in sets:
        argv += ["--set", kv]
    return argv + list(extra)


def run(data, run_dir, setting, name, *extra, env=None, log_dir=None):
    return launch(train_argv(data, run_dir, setting, *extra), SETTINGS[setting][1],
                  log_dir or os.path.dirname(run_dir), name, env=env)


@pytest.fixture(scope="module")
def reference(synth_dir2, tmp_path_factory):
    """One uninterrupted run per setting: run dir and records by step."""
    root = tmp_path_factory.mktemp("ref")
    out = {}
    for setting in SETTINGS:
        run_dir = str(root / setting)
        done = run(synth_dir2, run_dir, setting, f"ref_{setting}")
        assert done.codes == [0] * len(done.codes), done
        out[setting] = (run_dir, by_step(records(run_dir)))
    return out


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def by_step(recs):
    steps = [r["step"] for r in recs]
    assert len(steps) == len(set(steps)), f"a step recorded twice: {steps}"
    return {r["step"]: {k: v for k, v in r.items() if k not in VOLATILE and not k.startswith("time/")} for r in recs}


def tb_scalars(run_dir):
    """tag -> [(step, value)] as TensorBoard shows it (purged steps hidden)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run_dir, "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def complete(run_dir):
    root = os.path.join(run_dir, "checkpoints")
    names = os.listdir(root) if os.path.isdir(root) else []
    return sorted(int(n[5:]) for n in names if n.startswith("step_") and not n.endswith(".tmp")
                  and os.path.isfile(os.path.join(root, n, "meta.json")))


def assert_same_as_reference(run_dir, ref):
    import numpy as np

    raw = records(run_dir)
    got = by_step(raw)
    assert sorted(got) == sorted(ref), (sorted(got), sorted(ref))
    for step in ref:
        assert got[step] == ref[step], (step, {k: (got[step].get(k), v) for k, v in ref[step].items()
                                               if got[step].get(k) != v})
    for tag, points in tb_scalars(run_dir).items():
        steps = [s for s, _ in points]
        assert steps == sorted(set(steps)), f"TensorBoard {tag}: a step twice or out of order: {steps}"
        assert steps == sorted(s for s, r in ((r["step"], r) for r in raw) if isinstance(r.get(tag), float)), tag
        for s, v in points:
            value = next(r[tag] for r in raw if r["step"] == s)
            assert np.float32(value) == np.float32(v), (tag, s, value, v)


def _cases():
    return [pytest.param(setting, point, step, id=f"{setting}-{point}@{step}")
            for setting in SETTINGS for point, step in KILLS[setting]]


@pytest.mark.parametrize("setting,point,step", _cases())
def test_a_kill_at_each_fault_point_loses_no_record(synth_dir2, reference, tmp_path, setting, point, step):
    ref_dir, ref = reference[setting]
    run_dir = str(tmp_path / "run")
    killed = run(synth_dir2, run_dir, setting, "killed", env={"DUALRPO_FAULT": f"{point}@{step}"})
    assert killed.killed and f"fault injection: kill at {point}@{step}" in killed.log(0), killed

    logged = step if point in ("after_log", "mid_checkpoint", "after_checkpoint") else step - 1
    saved = [s for s in CKPT_STEPS if s < step or (s == step and point == "after_checkpoint")]
    on_disk = by_step(records(run_dir)) if os.path.exists(os.path.join(run_dir, "metrics.jsonl")) else {}
    assert sorted(s for s in on_disk if s > 0) == list(range(1, logged + 1)), sorted(on_disk)
    assert all(on_disk[s] == ref[s] for s in on_disk), "a record written before the kill differs"
    assert complete(run_dir) == saved
    tmp = os.path.join(run_dir, "checkpoints", f"step_{step:08d}.tmp")
    assert os.path.isdir(tmp) == (point == "mid_checkpoint")

    resumed = run(synth_dir2, run_dir, setting, "resumed", "--resume", "auto")
    assert resumed.codes == [0] * len(resumed.codes), resumed
    assert_same_as_reference(run_dir, ref)
    assert complete(run_dir) == list(CKPT_STEPS)
    assert not [n for n in os.listdir(os.path.join(run_dir, "checkpoints")) if n.endswith(".tmp")]
    if point == "mid_checkpoint":
        assert f"removed step_{step:08d}.tmp" in resumed.log(0), resumed


def test_a_failed_write_on_one_rank_stops_every_rank_with_one_line(synth_dir2, reference, tmp_path):
    """EIO on rank 1 alone, in the middle of checkpoint 2: both ranks stop with the same line (the file,
    the cause, the free space, no good checkpoint yet, how to resume), no traceback, and no hang."""
    ref_dir, ref = reference["tp2"]
    run_dir = str(tmp_path / "run")
    failed = run(synth_dir2, run_dir, "tp2", "failed", env={"DUALRPO_FAULT": "mid_checkpoint@2,EIO,rank=1"})
    assert failed.codes == [1, 1], failed
    lines = [last_line(failed.log(r)) for r in (0, 1)]
    assert lines[0] == lines[1], lines
    line = lines[0]
    for part in ("dualrpo train: checkpoint of step 2 (rank 1) failed writing", "rank_00001.pt",
                 "Input/output error", "(EIO)", "free of", "No complete checkpoint yet", "--resume auto"):
        assert part in line, (part, line)
    assert "Traceback" not in failed.log(0) + failed.log(1)
    assert complete(run_dir) == []

    resumed = run(synth_dir2, run_dir, "tp2", "resumed", "--resume", "auto")
    assert resumed.codes == [0, 0], resumed
    assert_same_as_reference(run_dir, ref)


def last_line(text):
    return [ln for ln in text.splitlines() if ln.strip()][-1]


def _copy_with_truncated(ref_dir, dest, rel):
    shutil.copytree(ref_dir, dest)
    path = os.path.join(dest, "checkpoints", "step_00000003", rel)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    return path


def _shard(run_dir, step=3):
    dist_dir = os.path.join(run_dir, "checkpoints", f"step_{step:08d}", "dist")
    return os.path.join("dist", sorted(n for n in os.listdir(dist_dir) if n.endswith(".distcp"))[-1])


def test_an_unreadable_newest_checkpoint_falls_back_under_auto(synth_dir2, reference, tmp_path):
    """A truncated shard of checkpoint 3 (read inside Megatron's collective load): every rank falls back
    to checkpoint 2, a warning names the file, and step 3 is trained and logged again, bitwise."""
    ref_dir, ref = reference["tp2"]
    run_dir = str(tmp_path / "run")
    bad = _copy_with_truncated(ref_dir, run_dir, _shard(ref_dir))
    resumed = run(synth_dir2, run_dir, "tp2", "resumed", "--resume", "auto")
    assert resumed.codes == [0, 0], resumed
    warning = [ln for ln in resumed.log(0).splitlines() if "falling back to" in ln]
    # The cause as the checkpoint reader words it: a zip error on megatron-core 0.16, EOFError on 0.19.
    assert warning and f"{bad} (" in warning[0] and ("zip archive" in warning[0] or "EOFError" in warning[0]), resumed
    assert warning[0].endswith("falling back to " + os.path.join(run_dir, "checkpoints", "step_00000002")), warning
    assert "train: 1 steps (last 3)" in resumed.log(0)
    assert_same_as_reference(run_dir, ref)


def test_an_unreadable_explicit_checkpoint_is_one_line_on_every_rank(synth_dir2, reference, tmp_path):
    """Rank 1's own file truncated (rank 0 reads fine): no fallback for an explicit path; both ranks
    stop with one line naming the file and the cause, without a traceback from the peer."""
    ref_dir, _ = reference["tp2"]
    run_dir = str(tmp_path / "run")
    bad = _copy_with_truncated(ref_dir, run_dir, "rank_00001.pt")
    failed = run(synth_dir2, run_dir, "tp2", "failed", "--resume", os.path.dirname(bad))
    assert failed.codes == [1, 1], failed
    for r in (0, 1):
        line = last_line(failed.log(r))
        assert line.startswith(f"dualrpo train: cannot load checkpoint {os.path.dirname(bad)} (rank 1): {bad}: "), line
        assert line.endswith("bytes), truncated or corrupt"), line
        assert "Traceback" not in failed.log(r) and "Connection closed" not in failed.log(r)


def test_a_checkpoint_of_another_layout_is_refused_or_resharded(synth_dir2, reference, tmp_path):
    """TP=2 on 2 processes -> one process: the per-rank files cannot follow; refused, differences named.
    TP=2 -> TP=1 x DP=2 (same world, plain optimizer): torch_dist reshards; a warning, and step 3 comes
    out as the TP=2 run's up to summation order."""
    ref_dir, ref = reference["tp2"]
    one = str(tmp_path / "one")
    shutil.copytree(ref_dir, one)
    refused = launch(train_argv(synth_dir2, one, "tp1", "--resume", "auto"), 1, str(tmp_path), "refused")
    assert refused.codes == [1], refused
    line = last_line(refused.log(0))
    assert "tp 2 vs 1" in line and "world_size 2 vs 1" in line and "cannot be resharded" in line, line

    dp = str(tmp_path / "dp")
    shutil.copytree(ref_dir, dp)
    argv = train_argv(synth_dir2, dp, "tp1", "--resume", os.path.join(dp, "checkpoints", "step_00000002"))
    resharded = launch(argv, 2, str(tmp_path), "resharded")
    assert resharded.codes == [0, 0], resharded
    assert "tp 2 vs 1; resharding on load" in resharded.log(0)
    got = by_step(records(dp))[3]
    for key in ("grad_norm", "self_certainty/all", "entropy/all"):
        assert got[key] == pytest.approx(ref[3][key], rel=1e-4), key


# ------------------------------------------------------------------------------------ full disk
@pytest.fixture
def small_disk(tmp_path):
    """A mount factory: ``small_disk(size)`` -> a fresh tmpfs of that size, unmounted afterwards."""
    mounted = []

    def make(size):
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        if os.geteuid() != 0:
            pytest.skip("a real full disk needs a tmpfs mount, which needs root (CI runs as root)")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if proc.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode})")
        mounted.append(str(where))
        return str(where)

    yield make
    for where in mounted:
        subprocess.run(["umount", "-l", where], check=False)


def test_a_full_disk_stops_with_a_clear_error_and_loses_nothing(synth_dir2, reference, small_disk, tmp_path):
    """9 MiB: checkpoints 1 and 2 (3.7 MiB each) fit, checkpoint 3 does not: refused before writing, with
    the path, the free space and the last good checkpoint. Moved to a larger disk, ``--resume auto``
    finishes, with step 3 logged once and every step bitwise the reference's."""
    _, ref = reference["tp1"]
    run_dir = os.path.join(small_disk("9M"), "run")
    full = run(synth_dir2, run_dir, "tp1", "full", "--set", "checkpoint.every=1", "--set", "checkpoint.keep_last=3",
               log_dir=str(tmp_path))
    assert full.codes == [1], full
    line = last_line(full.log(0))
    assert line.startswith("dualrpo train: checkpoint of step 3 failed writing "), line
    for part in ("step_00000003.tmp", "No space left on device", "(ENOSPC)", "free of 9.0 MiB",
                 "Nothing of step 3 was written", "Last good checkpoint: ", "step_00000002", "--resume auto"):
        assert part in line, (part, line)
    assert "Traceback" not in full.log(0)
    assert complete(run_dir) == [1, 2] and not os.path.exists(os.path.join(run_dir, "checkpoints", "step_00000003.tmp"))

    bigger = str(tmp_path / "bigger")
    shutil.copytree(run_dir, bigger)
    resumed = run(synth_dir2, bigger, "tp1", "resumed", "--resume", "auto", "--set", "checkpoint.every=1")
    assert resumed.codes == [0], resumed
    assert_same_as_reference(bigger, ref)


def test_a_disk_that_fills_mid_write_leaves_no_checkpoint(synth_dir2, small_disk, tmp_path):
    """2 MiB: the first checkpoint (no earlier one to size it by) runs out of space inside torch's
    writers; the error still says disk full, names the path and that nothing was kept."""
    run_dir = os.path.join(small_disk("2M"), "run")
    full = run(synth_dir2, run_dir, "tp1", "full", "--set", "checkpoint.every=1", log_dir=str(tmp_path))
    assert full.codes == [1], full
    line = last_line(full.log(0))
    for part in ("checkpoint of step 1 failed writing", "disk full", "free of 2.0 MiB",
                 "step_00000001.tmp is partial, never loaded, and removed at the next start",
                 "No complete checkpoint yet", "--resume auto"):
        assert part in line, (part, line)
    assert "Traceback" not in full.log(0)
    assert complete(run_dir) == []
