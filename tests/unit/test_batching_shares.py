"""The one rule for a data-parallel rank's share of a step's groups (``batching.dp_bounds`` /
``dp_slice``): every group is trained on exactly once, for any number of groups and ranks, and a rank
without a group gets a filler that carries no response token. Checked by enumerating the rows each
rank receives against the plain set of rows, not against the rule's own arithmetic."""
import pytest
import torch

from dualrpo_mcore.actor import batching

G = 2


def _batch(groups):
    rows = G * groups
    s = 6
    ids = torch.arange(rows)[:, None].expand(rows, s).clone() + 10  # row r's tokens all equal r + 10
    attn = torch.ones(rows, s, dtype=torch.long)
    resp = torch.zeros(rows, s, dtype=torch.long)
    resp[:, 3:] = 1
    return dict(input_ids=ids, attention_mask=attn, response_mask=resp,
                accuracy=torch.arange(rows, dtype=torch.float32))


@pytest.mark.parametrize("groups,dp", [(4, 2), (3, 2), (5, 3), (7, 4), (2, 2), (1, 2), (2, 3), (6, 1)])
def test_every_group_is_trained_on_exactly_once(groups, dp):
    batch = _batch(groups)
    trained, fillers, sizes = [], 0, []
    for rank in range(dp):
        mine = batching.dp_slice(batch, G, image_token_id=999, merge=2, dp=dp, rank=rank)
        assert mine["input_ids"].shape[0] % G == 0
        if "filler" in mine:
            fillers += 1
            assert int(mine["response_mask"].sum()) == 0 and bool(mine["filler"].all())
            continue
        rows = [int(r[0]) - 10 for r in mine["input_ids"]]
        assert torch.equal(mine["accuracy"], torch.tensor(rows, dtype=torch.float32))  # row fields stay aligned
        trained += rows
        sizes.append(len(rows) // G)
    assert sorted(trained) == list(range(G * groups))  # none dropped, none twice
    assert fillers == max(0, dp - groups)
    assert max(sizes) - min(sizes) <= 1  # balanced


def test_shares_are_contiguous_and_cover_the_groups():
    for n in range(0, 12):
        for dp in range(1, 6):
            b = batching.dp_bounds(n, dp)
            assert b[0] == 0 and b[-1] == n and all(x <= y for x, y in zip(b, b[1:]))


def test_a_batch_that_is_not_whole_groups_is_refused():
    batch = _batch(2)
    batch = {k: v[:3] for k, v in batch.items()}
    with pytest.raises(ValueError, match="3 rows, not a multiple of rollout.group_size=2"):
        batching.dp_slice(batch, G, 999, 2, dp=2, rank=0)
