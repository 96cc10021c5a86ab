"""``actor.packed``: a micro-batch's stream, its prediction targets and the map back to ``[b, s]``, against the
padded layout by brute force (no Megatron needed; the numbers: tests/distributed/test_packed_actor.py)."""
import pytest
import torch

from dualrpo_mcore.actor.packed import pack_micro
from dualrpo_mcore.models.qwen2_5_vl import testing

MERGE = 2


def _mb():
    mb = testing.make_batch(seed=1, rows=((), ((6, 8),), ((4, 4),), ()))
    resp = mb["attention_mask"].clone()
    resp[:, :4] = 0
    resp[2, 10:] = 0  # a row whose response stops before its end
    mb["response_mask"] = resp
    return mb


@pytest.mark.parametrize("multiple", [1, 16])
def test_targets_stay_within_rows_and_map_back(multiple):
    mb = _mb()
    pm = pack_micro(mb, testing.IMAGE, MERGE, multiple)
    real, resp = mb["attention_mask"].bool(), mb["response_mask"].bool()
    assert pm.total % multiple == 0 and pm.total - int(real.sum()) < multiple and pm.labels.shape == (pm.total - 1,)
    cu = pm.packing.cu_seqlens.tolist()
    for p in pm.keep.nonzero()[:, 0].tolist():
        # Position p predicts token p + 1 of its own row, and that token is a response token.
        row = max(r for r in range(len(cu) - 1) if cu[r] <= p)
        assert cu[row] <= p < p + 1 < cu[row + 1]
        assert resp[row, p + 1 - cu[row]] and pm.labels[p] == mb["input_ids"][row, p + 1 - cu[row]]
    assert int(pm.keep.sum()) == int(resp[:, 1:].sum())
    # A statistic of position p lands at the predicted token's [b, s] place: the padded layout's.
    stat = torch.arange(1.0, pm.total)
    want = torch.zeros(real.shape)
    for r in range(real.shape[0]):
        for j in range(1, int(real[r].sum())):
            want[r, j] = cu[r] + j  # position cu[r] + j - 1 holds the value cu[r] + j
    # Column 0 holds the previous row's last position (no prediction); the response mask is 0 there.
    assert torch.equal(pm.to_rows(stat) * resp, want * resp) and not resp[:, 0].any()


def test_rows_with_holes_are_refused():
    mb = _mb()
    mb["attention_mask"][1, 2] = 0
    with pytest.raises(ValueError, match="row 1: attention_mask is not right-padded"):
        pack_micro(mb, testing.IMAGE, MERGE, 1)
