"""A checkpoint write that fails on one rank, at each place a save writes, on 2 gloo processes with a
real Megatron GPTModel + optimizer: every rank raises the same CheckpointSaveError at the same point
(none hangs in a collective its peer never joins), the previous checkpoint stays the newest, and the
next save succeeds. Places: Megatron's common.pt (rank 0 alone, before the collective write), a
shard of the collective write (rank 1), the per-rank file (rank 1), the publish (rank 0).
The kill-and-resume matrix of the whole loop is in test_faults.py."""
import errno

from dualrpo_mcore.parallel.spawn import run_distributed
from helpers import tiny_gpt


PLACES = [("common", 0), ("shard", 1), ("rank file", 1), ("publish", 0)]


def _failing(rank, where, target_rank):
    """A context manager that makes one write fail on ``target_rank`` (ENOSPC, as a full disk)."""
    import contextlib
    import os

    import torch
    from torch.distributed.checkpoint import filesystem

    from dualrpo_mcore.trainer import checkpoint as ck

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", f"<{where} on rank {rank}>")

    real_save = torch.save

    def save(obj, f, *args, **kwargs):  # Megatron's common.pt only (torch.save serves others too)
        if isinstance(f, (str, os.PathLike)) and str(f).endswith("common.pt"):
            full()
        return real_save(obj, f, *args, **kwargs)

    @contextlib.contextmanager
    def patched():
        if rank != target_rank:
            yield
            return
        owner, name, fake = {"common": (torch, "save", save), "shard": (filesystem, "_write_item", full),
                             "rank file": (ck, "_write_rank_state", full), "publish": (ck, "_write_meta", full)}[where]
        real = getattr(owner, name)
        setattr(owner, name, fake)
        try:
            yield
        finally:
            setattr(owner, name, real)

    return patched()


def _all_places(rank, world, root):
    import os

    from dualrpo_mcore.parallel import initialize
    from dualrpo_mcore.trainer import checkpoint as ck
    from dualrpo_mcore.trainer.storage import CheckpointSaveError

    initialize(2, 1, backend="gloo", seed=7)
    model, ddp, opt = tiny_gpt.build(2, False)
    mgr = ck.CheckpointManager(root, keep_last=10)
    tiny_gpt.step(ddp, opt)
    mgr.save(1, model, opt, extra_state={})
    # megatron-core 0.19 writes no common.pt (torch_dist keeps non-tensor data in the collective write).
    wrote_common = any("common.pt" in files for _, _, files in os.walk(root))
    places = [p for p in PLACES if wrote_common or p[0] != "common"]
    out = {"places": places}
    for step, (where, target) in enumerate(places, 2):
        with _failing(rank, where, target):
            try:
                mgr.save(step, model, opt, extra_state={})
                out[where] = "saved"
            except CheckpointSaveError as e:
                out[where] = str(e)
        out[where + " newest"] = os.path.basename(mgr.latest())
    out["after"] = os.path.basename(mgr.save(9, model, opt, extra_state={}))
    out["tmp left"] = sorted(n for n in os.listdir(root) if n.endswith(".tmp"))
    return out


def test_a_write_failing_on_one_rank_fails_the_save_on_every_rank_alike(tmp_path):
    from importlib.metadata import version

    from packaging.version import Version

    results = run_distributed(_all_places, 2, str(tmp_path), timeout=240)
    places = results[0]["places"]
    assert places == PLACES or (Version(version("megatron-core")) >= Version("0.19") and places == PLACES[1:]), places
    for where, target in places:
        texts = [results[r][where] for r in (0, 1)]
        assert texts[0] == texts[1], (where, texts)
        assert f"(rank {target}) failed writing <{where} on rank {target}>: No space left on device (ENOSPC)" in texts[0]
        assert "Last good checkpoint: " in texts[0] and texts[0].endswith("--resume auto (checkpoint.resume='auto').")
        assert results[0][where + " newest"] == "step_00000001", where
    assert results[0]["after"] == "step_00000009" and results[0]["tmp left"] == []
