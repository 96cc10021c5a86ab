"""Fault points, storage errors and the record-before-checkpoint order, without a process group.

The kills themselves (real SIGKILLs at every point, TP=1 and TP=2) and the real full disk are in
tests/distributed/test_faults.py; here: the hook's contract, the messages a failed write or read gives
(path, cause, free space, last good checkpoint, how to resume), a read-only and a missing run dir,
layouts that do or do not reshard, and ``dualrpo train --tp 2`` started as one process."""
import errno
import os
import shlex
import subprocess
import types

import pytest
import torch

from dualrpo_mcore.trainer import checkpoint as ck
from dualrpo_mcore.trainer import faults, recovery, storage
from dualrpo_mcore.trainer.checkpoint import CheckpointManager
from dualrpo_mcore.trainer.metrics import MetricsLogger, read_jsonl


@pytest.fixture(autouse=True)
def disarmed():
    faults.arm("")
    yield
    faults.arm("")


# ------------------------------------------------------------------------------------ the hook
def test_fault_specs_parse_and_bad_ones_name_the_format():
    assert faults.parse("mid_checkpoint@3") == faults.Fault("mid_checkpoint", 3, "kill", None)
    assert faults.parse("after_log@2,ENOSPC,rank=1") == faults.Fault("after_log", 2, "ENOSPC", 1)
    for bad in ("mid_checkpoint", "nowhere@2", "after_log@x", "after_log@2,EWHAT"):
        with pytest.raises(ValueError, match="DUALRPO_FAULT"):
            faults.parse(bad)


def test_the_hook_is_off_unless_armed_and_fires_only_at_its_point_and_step(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    assert faults.arm() is None
    for point in faults.POINTS:
        faults.at(point, 1)  # disarmed: nothing happens anywhere
    monkeypatch.setenv(faults.ENV, "after_sync@2,EIO")
    assert faults.arm() == faults.Fault("after_sync", 2, "EIO")
    faults.at("after_sync", 1)
    faults.at("after_log", 2)
    with pytest.raises(OSError) as info:
        faults.at("after_sync", 2, "/some/file")
    assert info.value.errno == errno.EIO and info.value.filename == "/some/file"
    faults.arm("after_sync@2,EIO,rank=1")  # this process is rank 0
    faults.at("after_sync", 2)


# ------------------------------------------------------------------------------------ messages
def test_causes_are_one_line_with_the_errno_name():
    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    assert storage.cause(OSError(errno.ENOSPC, "No space left on device", "/x")) == "No space left on device (ENOSPC)"
    try:
        raise RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory. "
                           "This is an internal miniz error. If you are seeing this error, there is a high likelihood")
    except RuntimeError as e:
        wrapped = CheckpointException("read", {1: _wrap_exception(e)})
    assert storage.cause(wrapped) == ("RuntimeError: PytorchStreamReader failed reading zip archive: failed "
                                      "finding central directory")
    try:
        raise OSError(errno.EDQUOT, "Disk quota exceeded", "/x/y.distcp")
    except OSError as e:
        wrapped = CheckpointException("write", {0: _wrap_exception(e)})
    assert storage.filename_of(wrapped) == "/x/y.distcp" and storage.errno_of(wrapped) == errno.EDQUOT


def test_a_short_write_on_a_full_disk_is_called_a_full_disk(tmp_path, monkeypatch):
    short = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    monkeypatch.setattr(storage, "disk_space", lambda path: (4096, 9 << 20))
    text = storage.write_failed("checkpoint of step 3", str(tmp_path), short, str(tmp_path / "step_00000002"),
                                kept="Nothing of step 3 was written", target=str(tmp_path / "step_00000003.tmp"))
    assert text == (f"checkpoint of step 3 failed writing {tmp_path}/step_00000003.tmp: disk full: RuntimeError: "
                    f"[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598; 4.0 KiB free of 9.0 MiB "
                    f"at {tmp_path}. Nothing of step 3 was written. Last good checkpoint: {tmp_path}/step_00000002. "
                    f"Free space or fix the path, then rerun the same command with --resume auto "
                    f"(checkpoint.resume='auto').")


def test_a_failed_checkpoint_write_names_file_space_and_last_good(tmp_path, monkeypatch):
    mgr = CheckpointManager(str(tmp_path))
    mgr.save(1, extra_state={"s": 1})

    def full(path, payload):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(ck, "_write_rank_state", full)
    with pytest.raises(storage.CheckpointSaveError) as info:
        mgr.save(2, extra_state={"s": 2})
    text = str(info.value)
    for part in (f"checkpoint of step 2 failed writing {tmp_path}/step_00000002.tmp/rank_00000.pt",
                 "No space left on device (ENOSPC)", "free of", f"Last good checkpoint: {tmp_path}/step_00000001",
                 "step_00000002.tmp is partial, never loaded, and removed at the next start", "--resume auto"):
        assert part in text, (part, text)
    assert isinstance(info.value, OSError) and isinstance(info.value.__cause__, OSError)
    assert mgr.latest() == mgr.step_dir(1)


def test_a_save_that_would_not_fit_is_refused_before_writing(tmp_path, monkeypatch):
    mgr = CheckpointManager(str(tmp_path))
    mgr.save(1, extra_state={"blob": torch.zeros(50_000)})
    size = ck._meta(mgr.step_dir(1))["bytes"]
    assert size > 200_000
    monkeypatch.setattr(storage, "disk_space", lambda path: (size // 2, 9 << 20))
    with pytest.raises(storage.CheckpointSaveError, match=r"needs about .* the size of step_00000001 \(ENOSPC\)"):
        mgr.save(2, extra_state={"blob": torch.zeros(50_000)})
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_00000001"]
    assert CheckpointManager(str(tmp_path), check_space=False).save(2, extra_state={}) == mgr.step_dir(2)


def test_an_unreadable_rank_file_names_itself(tmp_path):
    mgr = CheckpointManager(str(tmp_path))
    path = mgr.save(1, extra_state={"blob": torch.zeros(1000)})
    rank_file = os.path.join(path, "rank_00000.pt")
    with open(rank_file, "r+b") as f:
        f.truncate(os.path.getsize(rank_file) // 2)
    with pytest.raises(storage.CheckpointLoadError, match=f"^{rank_file}: .*truncated or corrupt$"):
        mgr.load()


def test_layouts_that_reshard_and_layouts_that_do_not(tmp_path):
    base = {"tp": 2, "pp": 1, "world_size": 2, "distributed_optimizer": False, "model": {"hidden_size": 64}}
    assert recovery.layout_differences(base, dict(base)) == ([], True)
    assert recovery.layout_differences(base, dict(base, tp=1)) == (["tp 2 vs 1"], True)
    assert recovery.layout_differences(dict(base, distributed_optimizer=True),
                                       dict(base, tp=1, distributed_optimizer=True)) == (["tp 2 vs 1"], False)
    assert recovery.layout_differences(base, dict(base, world_size=1)) == (["world_size 2 vs 1"], False)
    assert recovery.layout_differences(base, dict(base, model={"hidden_size": 32})) == (
        ["model.hidden_size 64 vs 32"], False)
    assert recovery.layout_differences(None, base) == ([], True)  # a checkpoint from before layouts were saved

    mgr = CheckpointManager(str(tmp_path))
    path = mgr.save(1, extra_state={}, layout=base)
    with pytest.raises(storage.CheckpointMismatchError, match=r"model.hidden_size 64 vs 32; it cannot be resharded"):
        mgr.load(path, layout=dict(base, model={"hidden_size": 32}))
    assert mgr.load(path, layout=dict(base, tp=1))["step"] == 1


# ------------------------------------------------------------------------------------ run dirs
def _cfg(run_dir):
    return types.SimpleNamespace(logging=types.SimpleNamespace(run_dir=run_dir),
                                 checkpoint_dir=os.path.join(run_dir, "checkpoints"))


def test_a_run_dir_that_cannot_be_created_stops_before_anything_is_built(tmp_path):
    (tmp_path / "a_file").write_text("")
    run_dir = str(tmp_path / "a_file" / "run")
    with pytest.raises(storage.StorageError) as info:
        recovery.preflight(_cfg(run_dir))
    text = str(info.value)
    assert text.startswith(f"the run cannot start: the write test of {run_dir} failed writing {run_dir}: "
                           "Not a directory (ENOTDIR); "), text
    assert "No complete checkpoint yet" in text and "--resume auto" in text


def test_a_read_only_run_dir_stops_before_anything_is_built(tmp_path):
    where = tmp_path / "ro"
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("a read-only file system needs a tmpfs mount, which needs root (CI runs as root)")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1M", "tmpfs", str(where)], capture_output=True,
                          text=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode})")
    try:
        with pytest.raises(storage.StorageError, match=r"write test of .*/ro failed .*Read-only file system \(EROFS\)"):
            recovery.preflight(_cfg(str(where)))
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


# ------------------------------------------------------------------------------------ records
class _Logger:
    def __init__(self, calls, fail=None):
        self.calls, self.fail = calls, fail

    def log(self, step, metrics, durable=False):
        self.calls.append(("log", step, durable))
        if self.fail:
            raise self.fail


def _ctx(tmp_path, calls, fail=None):
    manager = CheckpointManager(str(tmp_path / "checkpoints"))
    return types.SimpleNamespace(logger=_Logger(calls, fail), manager=manager,
                                 cfg=types.SimpleNamespace(logging=types.SimpleNamespace(run_dir=str(tmp_path))))


def test_a_step_is_recorded_durably_before_its_checkpoint(tmp_path, monkeypatch):
    from dualrpo_mcore.trainer import context

    calls = []
    monkeypatch.setattr(context, "save", lambda ctx, step, poisoned: calls.append(("save", step, poisoned)))
    ctx = _ctx(tmp_path, calls)
    recovery.commit(ctx, 1, {"loss": 0.5}, checkpoint=False)
    recovery.commit(ctx, 2, {"loss": 0.5, "skipped": 1.0}, checkpoint=True)
    assert calls == [("log", 1, False), ("log", 2, True), ("save", 2, True)]


def test_a_record_that_cannot_be_written_stops_the_run_with_the_path(tmp_path, monkeypatch):
    from dualrpo_mcore.trainer import context

    monkeypatch.setattr(context, "save", lambda *a, **k: pytest.fail("checkpointed a step without its record"))
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "metrics.jsonl"))
    with pytest.raises(storage.StorageError, match=r"^the record of step 4 failed writing .*metrics.jsonl: No space"):
        recovery.commit(_ctx(tmp_path, [], fail=full), 4, {}, checkpoint=True)


def test_records_after_the_resumed_checkpoint_are_dropped_in_every_sink(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard", reason="tensorboard is an optional sink")
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    with MetricsLogger(str(tmp_path), tensorboard=True, progress=False, enabled=True) as log:
        for step in (0, 1, 2, 3):
            log.log(step, {"loss": float(step)}, durable=step == 2)
    assert len(synced) >= 3  # the JSONL file, the event file, their directories
    cfg = types.SimpleNamespace(checkpoint=types.SimpleNamespace(resume="auto"))
    assert recovery.records_to_keep(cfg, 2) == 2 and recovery.records_to_keep(cfg, 0) == -1
    assert recovery.records_to_keep(types.SimpleNamespace(checkpoint=types.SimpleNamespace(resume=None)), 0) is None
    with MetricsLogger(str(tmp_path), tensorboard=True, progress=False, enabled=True, resume_step=-1) as log:
        assert read_jsonl(str(tmp_path / "metrics.jsonl")) == []  # a resume that found no checkpoint
        log.log(0, {"loss": 0.0})
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(0, 0.0)]


# ------------------------------------------------------------------------------------ the CLI
def test_train_with_tp2_as_one_process_prints_the_commands_that_start_two(synth_dir, tmp_path, monkeypatch,
                                                                           capsys):
    from dualrpo_mcore.cli import build_parser, main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = str(tmp_path / "run")
    argv = ["train", "--data", synth_dir, "--out", out, "--tp", "2", "--steps", "3", "--set", "reward.lam=0.5",
            "--no-progress"]
    assert main(argv) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("dualrpo train")]
    assert len(lines) == 1, lines  # (imports may warn on stderr before it)
    err = lines[0]
    assert err.startswith("dualrpo train: tp=2 x pp=1 needs a multiple of 2 processes, this is 1")
    torchrun, launch = shlex.split(err.split("`")[1]), shlex.split(err.split("`")[3])
    assert torchrun[:6] == ["torchrun", "--standalone", "--nproc-per-node", "2", "-m", "dualrpo_mcore"]
    again = build_parser().parse_args(torchrun[6:])
    assert (again.out, again.overrides) == (out, ["actor.parallel.tp=2", "actor.parallel.pp=1", "schedule.steps=3",
                                                  "reward.lam=0.5", "logging.progress=false"])
    assert launch[0] == "dualrpo"
    job = build_parser().parse_args(launch[1:])
    assert (job.tp, job.nproc_per_node, job.executor, job.out) == (2, 2, "local", out)
    assert job.train_args == ["--set", "schedule.steps=3", "--set", "reward.lam=0.5"]
    assert not os.path.exists(out), "nothing may be written before the layout is known to fit"


def test_train_into_an_unwritable_run_dir_is_one_line(synth_dir, tmp_path, capsys):
    from dualrpo_mcore.cli import main

    (tmp_path / "a_file").write_text("")
    assert main(["train", "--data", synth_dir, "--out", str(tmp_path / "a_file" / "run"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dualrpo train: the run cannot start: the write test of ") and "ENOTDIR" in err[-1]
    assert not any("Traceback" in ln for ln in err)

