"""The gloo launcher itself: results come back in rank order and a failing rank surfaces."""
import pytest
import torch
import torch.distributed as dist

from dualrpo_mcore.parallel.spawn import run_distributed


def _allreduce(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return {"rank": rank, "sum": t}


def _fail_on_one(rank, world_size):
    if rank == 1:
        raise ValueError("boom on rank one")
    return rank


def test_results_in_rank_order():
    out = run_distributed(_allreduce, 2)
    assert [o["rank"] for o in out] == [0, 1]
    assert all(float(o["sum"]) == 3.0 for o in out)


def test_failure_is_reraised_with_rank():
    with pytest.raises(RuntimeError, match="rank 1 of 2 failed(.|\n)*boom on rank one"):
        run_distributed(_fail_on_one, 2, timeout=60)
