"""CheckpointManager with a real Megatron-Core GPTModel + Megatron optimizer on 2 gloo processes:
save -> train on (perturb) -> load restores params, optimizer state and RNG streams bitwise, so the
next steps give bitwise the same losses and parameters as the uninterrupted run; a crash inside
the save leaves the previous checkpoint loadable; keep-last-k and resume auto. Settings: TP=2 with
the plain Megatron optimizer, and TP=1 x DP=2 with the distributed optimizer. One spawned group
runs every setting (process start-up dominates on 2 cores)."""
import copy
import os

import pytest

from dualrpo_mcore.parallel.spawn import run_distributed
from helpers import tiny_gpt


def _snapshot(model, opt):
    import torch

    params = {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    inner = [o.optimizer for o in getattr(opt, "chained_optimizers", [opt])]
    state = [copy.deepcopy(o.state_dict()) for o in inner]
    for sd in state:  # Megatron's load leaves its own copy of the step in torch's param groups,
        for g in sd["param_groups"]:  # where torch Adam never reads it (it uses state[p]["step"])
            g.pop("step", None)
    return params, state


def _equal(a, b):
    import torch

    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _one_setting(root, tp, distopt):
    import torch

    from dualrpo_mcore.parallel import initialize
    from dualrpo_mcore.trainer import checkpoint as ck

    initialize(tp, 1, backend="gloo", seed=7)
    model, ddp, opt = tiny_gpt.build(tp, distopt)
    mgr = ck.CheckpointManager(root, keep_last=2)
    tiny_gpt.step(ddp, opt)
    mgr.save(1, model, opt, extra_state={"data": {"position": 2}})
    tiny_gpt.step(ddp, opt)
    saved = mgr.save(2, model, opt, extra_state={"data": {"position": 4}})
    at_save = _snapshot(model, opt)
    ref_losses = [tiny_gpt.step(ddp, opt) for _ in range(3)]
    ref_params = _snapshot(model, opt)[0]

    # A crash inside the save of step 5, after the sharded files are written, on every rank.
    def crash(path, payload):
        raise OSError("killed mid-write")

    real, ck._write_rank_state = ck._write_rank_state, crash
    try:
        with pytest.raises(OSError, match="killed mid-write"):
            mgr.save(5, model, opt, extra_state={})
    finally:
        ck._write_rank_state = real
    assert os.path.isdir(os.path.join(root, "step_00000005.tmp"))

    torch.manual_seed(1000 + torch.distributed.get_rank())  # perturb every stream and the weights
    tiny_gpt.step(ddp, opt)
    assert mgr.resolve_resume("auto") == saved
    out = mgr.load(mgr.resolve_resume("auto"), model, opt)
    assert out["step"] == 2 and out["extra"] == {"data": {"position": 4}}
    after_load = _snapshot(model, opt)
    losses = [tiny_gpt.step(ddp, opt) for _ in range(3)]
    return {
        "params_restored": _equal(after_load[0], at_save[0]),
        "optim_restored": _equal(after_load[1], at_save[1]),
        "losses_equal": _equal(losses, ref_losses),
        "params_equal": _equal(_snapshot(model, opt)[0], ref_params),
        "kept": [s for s, _ in mgr.complete()],
        "files": sorted(os.listdir(saved)),
        "losses": [float(x) for x in losses], "ref": [float(x) for x in ref_losses],
    }


def _all_settings(rank, world, root):
    return {name: _one_setting(os.path.join(root, name), tp, distopt)
            for name, tp, distopt in (("tp2", 2, False), ("dp2_distopt", 1, True))}


def test_megatron_save_load_bitwise(tmp_path):
    results = run_distributed(_all_settings, 2, str(tmp_path), timeout=240)
    for rank, per in enumerate(results):
        for name, r in per.items():
            where = f"rank {rank} {name}"
            assert r["params_restored"], where
            assert r["optim_restored"], where
            assert r["losses_equal"], f"{where}: {r['losses']} vs {r['ref']}"
            assert r["params_equal"], where
            assert r["kept"] == [1, 2], where
            assert {"dist", "meta.json", "rank_00000.pt", "rank_00001.pt"} <= set(r["files"]), where
    # The two settings are different models, but each must have moved the weights between steps.
    assert results[0]["tp2"]["losses"][0] != results[0]["tp2"]["losses"][1]
