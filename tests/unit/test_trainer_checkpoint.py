"""CheckpointManager without a process group: atomic publish, crash mid-write, stale temp dirs,
keep-last-k, resume resolution, poisoned steps and RNG/loop-state round trips. The Megatron model +
optimizer path is in tests/distributed/test_trainer_checkpoint_megatron.py."""
import os
import random

import numpy as np
import pytest
import torch

from dualrpo_mcore.trainer import checkpoint as ck
from dualrpo_mcore.trainer.checkpoint import CheckpointManager, PoisonedStepError


def _draws():
    return (random.random(), float(np.random.rand()), float(torch.rand(1)))


def test_rng_and_extra_state_round_trip(tmp_path):
    mgr = CheckpointManager(str(tmp_path), keep_last=2)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    _draws()
    extra = {"data": {"epoch": 1, "position": 37}, "normaliser": torch.tensor([0.5, 2.0])}
    path = mgr.save(5, extra_state=extra)
    expected = _draws()
    _draws()  # move every stream on
    out = mgr.load()
    assert out["step"] == 5 and out["path"] == path and out["meta"]["world_size"] == 1
    assert out["extra"]["data"] == {"epoch": 1, "position": 37}
    assert torch.equal(out["extra"]["normaliser"], extra["normaliser"])
    assert _draws() == expected  # bitwise: the same next numbers on every stream


def test_keep_last_k_and_latest_marker(tmp_path):
    mgr = CheckpointManager(str(tmp_path), keep_last=2)
    for s in (1, 2, 3, 4):
        mgr.save(s, extra_state={"s": s})
    assert [s for s, _ in mgr.complete()] == [3, 4]
    assert (tmp_path / "latest").read_text().strip() == "step_00000004"
    assert mgr.latest() == mgr.step_dir(4) == mgr.resolve_resume("auto")
    assert CheckpointManager(str(tmp_path), keep_last=None).load(mgr.step_dir(3))["extra"] == {"s": 3}


def test_crash_mid_write_leaves_previous_loadable(tmp_path, monkeypatch):
    mgr = CheckpointManager(str(tmp_path), keep_last=3)
    mgr.save(1, extra_state={"s": 1})

    def boom(path, meta):
        with open(path, "w") as f:
            f.write('{"step": ')  # half a completion stamp, then the "crash"
        raise OSError("disk full")

    monkeypatch.setattr(ck, "_write_meta", boom)
    with pytest.raises(OSError, match="disk full"):
        mgr.save(2, extra_state={"s": 2})
    assert (tmp_path / "step_00000002.tmp").is_dir() and not (tmp_path / "step_00000002").exists()
    assert mgr.resolve_resume("auto") == mgr.step_dir(1)
    assert mgr.load()["extra"] == {"s": 1}
    monkeypatch.undo()
    mgr.save(2, extra_state={"s": 2})  # the next save cleans the stale temp dir
    assert not (tmp_path / "step_00000002.tmp").exists()
    assert mgr.load()["extra"] == {"s": 2}


def test_stale_tmp_and_stale_marker_are_ignored(tmp_path):
    mgr = CheckpointManager(str(tmp_path))
    mgr.save(3, extra_state={})
    os.makedirs(tmp_path / "step_00000009.tmp" / "dist")  # a crashed save of a later step
    os.makedirs(tmp_path / "step_00000007")  # renamed by hand, no meta.json: incomplete
    assert mgr.latest() == mgr.step_dir(3)
    mgr.save(4, extra_state={})
    assert not (tmp_path / "step_00000009.tmp").exists()  # cleaned by the save
    (tmp_path / "latest").write_text("step_00000003\n")  # crash between rename and marker update
    assert mgr.latest() == mgr.step_dir(4)
    os.makedirs(tmp_path / "step_00000010.tmp")
    assert mgr.clean_stale() == ["step_00000010.tmp"]


def test_resolve_resume_forms(tmp_path):
    mgr = CheckpointManager(str(tmp_path / "ckpt"))
    assert mgr.resolve_resume(None) is None and mgr.resolve_resume("none") is None
    assert mgr.resolve_resume("auto") is None  # nothing yet: fresh start
    with pytest.raises(FileNotFoundError, match="no complete checkpoint.*nowhere"):
        mgr.resolve_resume(str(tmp_path / "nowhere"))
    mgr.save(2, extra_state={})
    assert mgr.resolve_resume(str(tmp_path / "ckpt")) == mgr.step_dir(2)
    assert mgr.resolve_resume(mgr.step_dir(2)) == mgr.step_dir(2)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        CheckpointManager(str(tmp_path / "empty")).load()


def test_poisoned_and_nonfinite_refused(tmp_path):
    mgr = CheckpointManager(str(tmp_path))
    with pytest.raises(PoisonedStepError, match="step 3.*poisoned"):
        mgr.save(3, extra_state={}, poisoned=True)
    lin = torch.nn.Linear(2, 2)
    with torch.no_grad():
        lin.weight[0, 0] = float("nan")
    with pytest.raises(PoisonedStepError, match="non-finite"):
        mgr.save(3, model=lin)
    assert mgr.complete() == [] and not any(n.endswith(".tmp") for n in os.listdir(tmp_path) if tmp_path.exists())
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(str(tmp_path), keep_last=0)


def test_missing_rank_file_is_named(tmp_path):
    mgr = CheckpointManager(str(tmp_path))
    path = mgr.save(1, extra_state={})
    os.remove(os.path.join(path, "rank_00000.pt"))
    with pytest.raises(FileNotFoundError, match="rank_00000.pt"):
        mgr.load()


def test_a_checkpoint_of_another_layer_spec_is_refused_by_name(tmp_path):
    """The resolved spec is recorded; a run that resolved to the other one (whose weight names differ)
    is told which to set, before Megatron reports missing keys."""
    import json

    mgr = CheckpointManager(str(tmp_path))
    path = mgr.save(1, extra_state={})
    meta_file = os.path.join(path, ck.META)
    with open(meta_file) as f:
        meta = json.load(f)
    meta["spec_backend"] = "te"  # as a TE run's save writes it (its model says backend='te')
    with open(meta_file, "w") as f:
        json.dump(meta, f)
    local = torch.nn.Linear(2, 2)
    local.backend = "local"
    with pytest.raises(ValueError, match="built with the 'te' layer spec, this run builds 'local'"):
        mgr.load(model=local)
    assert ck._spec_backend([local]) == "local" and ck._spec_backend([torch.nn.Linear(2, 2)]) is None
