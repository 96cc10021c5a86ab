"""The storage census used to check the weight exporter's memory bound: hand-counted cases."""
import torch

from dualrpo_mcore.rollout.memcensus import peak_new_bytes


def test_counts_new_storage_not_views_of_existing():
    w = torch.randn(100, 100)

    def f():
        a = torch.empty(1000)  # 4000 B
        b = a * 2  # +4000 -> 8000
        del a  # 4000
        w[:10].contiguous()  # a view of an existing tensor: nothing new
        d = w.t().contiguous()  # +40000 -> 44000 (the peak)
        del d
        torch.cat([b, b])  # +8000 -> 12000, freed at once

    assert peak_new_bytes(f, [w]) == 44000
    assert peak_new_bytes(lambda: w.detach().view(-1)[:5], [w]) == 0


def test_retained_outputs_accumulate():
    keep = []
    assert peak_new_bytes(lambda: keep.extend(torch.zeros(250) for _ in range(4))) == 4000
