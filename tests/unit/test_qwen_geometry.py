"""Qwen2.5-VL index arithmetic vs transformers: mrope position ids, vision window order."""
import torch

from dualrpo_mcore.models.qwen2_5_vl import from_hf, geometry, testing


def _hf_model():
    return testing.tiny_hf_model(vision_depth=1, text_layers=1)


def test_rope_index_matches_transformers_on_mixed_padded_batch():
    hf = _hf_model()
    cfg = from_hf(hf.config)
    batch = testing.make_batch(rows=((), ((6, 8),), ((4, 10), (6, 6)), ((2, 2),)))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    want, want_delta = hf.model.get_rope_index(ids, (ids == testing.IMAGE).int(), batch["image_grid_thw"],
                                               attention_mask=mask)
    got, delta = geometry.rope_index(ids, batch["image_grid_thw"], cfg.image_token_id, cfg.spatial_merge_size, mask)
    valid = mask.bool()
    assert torch.equal(got[:, valid], want[:, valid])
    assert torch.equal(delta.view(-1), want_delta.view(-1))


def test_rope_index_rejects_token_image_mismatch():
    batch = testing.make_batch(rows=(((6, 8),),))
    import pytest

    with pytest.raises(ValueError, match="image_grid_thw has 2 images"):
        geometry.rope_index(batch["input_ids"], torch.tensor([[1, 6, 8], [1, 4, 4]]), testing.IMAGE, 2)


def test_window_permutation_matches_transformers():
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_window_index

    grid = torch.tensor([[1, 6, 8], [1, 4, 10], [2, 6, 6], [1, 8, 8]])
    order, lengths = geometry.window_permutation(grid, merge=2, window_size=16, patch_size=4)
    want_order, want_cu = get_vision_window_index(grid, spatial_merge_size=2, window_size=16, patch_size=4)
    assert torch.equal(order, want_order)
    assert torch.equal(torch.tensor([0] + lengths).cumsum(0), want_cu.long())
    seg = geometry.segment_lengths(grid)
    assert torch.equal(torch.tensor([0] + seg).cumsum(0), get_vision_cu_seqlens(grid).long())


def test_block_diagonal_and_causal_masks():
    m = geometry.block_diagonal_mask([2, 1])[0, 0]
    assert m.tolist() == [[False, False, True], [False, False, True], [True, True, False]]
    c = geometry.causal_padding_mask(torch.tensor([[1, 1, 0]]), 3, 1)[0, 0]
    assert c.tolist() == [[False, True, True], [False, False, True], [False, False, True]]


def test_rope_index_and_packed_rope_index_match_transformers_on_random_rows():
    """The position rule in tensor ops against transformers' ``get_rope_index`` on random rows: zero to three
    images of random grids per row, text of random length (none) around them, an empty row; the padded
    batch at once, and every row of the packed stream against the row alone."""
    from dualrpo_mcore.models.qwen2_5_vl.packing import pack

    hf = _hf_model()
    cfg = from_hf(hf.config)
    g = torch.Generator().manual_seed(7)
    rand = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    seqs, grids = [], []
    for r in range(9):
        ids = torch.randint(3, 190, (rand(0, 6),), generator=g).tolist() if r != 4 else []
        for _ in range(rand(0, 3) if r != 4 else 0):
            h, w = 2 * rand(1, 6), 2 * rand(1, 6)
            ids += [testing.VSTART] + [testing.IMAGE] * (h * w // 4) + [testing.VEND]
            ids += torch.randint(3, 190, (rand(0, 4),), generator=g).tolist()
            grids.append([1, h, w])
        seqs.append(ids)
    s = max(map(len, seqs))
    ids = torch.zeros(len(seqs), s, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(seqs):
        ids[r, :len(row)], mask[r, :len(row)] = torch.tensor(row, dtype=torch.long), 1
    grid = torch.tensor(grids)
    got, delta = geometry.rope_index(ids, grid, cfg.image_token_id, cfg.spatial_merge_size, mask)
    full = mask.bool().any(1)  # transformers cannot take the empty row: it gets 0 here
    want, want_delta = hf.model.get_rope_index(ids[full], (ids[full] == testing.IMAGE).int(), grid,
                                               attention_mask=mask[full])
    valid = mask[full].bool()
    assert torch.equal(got[:, full][:, valid], want[:, valid]) and not got[:, ~mask.bool()].any()
    assert torch.equal(delta.view(-1)[full], want_delta.view(-1)) and int(delta[4]) == 0

    stream, pos, packing = pack(ids, mask, grid, cfg.image_token_id, cfg.spatial_merge_size, multiple=8)
    first = 0
    for r, row in enumerate(seqs):
        a, b = int(packing.cu_seqlens[r]), int(packing.cu_seqlens[r + 1])
        n = sum(1 for t in row if t == testing.VSTART)
        if row:
            alone = torch.tensor([row])
            want_row, _ = hf.model.get_rope_index(alone, (alone == testing.IMAGE).int(),
                                                  grid[first:first + n] if n else None)
            assert torch.equal(pos[:, 0, a:b], want_row[:, 0]), r
        first += n
    assert not pos[:, 0, packing.tokens:].any()
