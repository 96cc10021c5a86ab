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
