"""Micro-batch slicing: rows, trimmed padding and each row's own images, and the inverse scatter."""
import pytest
import torch

from dualrpo_mcore.models.qwen2_5_vl import testing
from dualrpo_mcore.actor import batching


def _batch():
    # Rows: no image; one 6x8 image (12 tokens); two images 4x10 (10 tokens) + 6x6 (9 tokens); none.
    b = testing.make_batch(seed=1, rows=((), ((6, 8),), ((4, 10), (6, 6)), ()))
    b["response_mask"] = b["attention_mask"].clone()
    b["response_mask"][:, :3] = 0
    b["advantages"] = torch.arange(4.0)
    return b


def test_image_spans_follow_the_image_tokens():
    spans = batching.image_spans(_batch(), testing.IMAGE, 2)
    assert spans == [(0, 0, 0, 0), (0, 1, 0, 48), (1, 3, 48, 48 + 40 + 36), (3, 3, 124, 124)]


def test_select_rows_takes_rows_images_and_trims():
    b = _batch()
    spans = batching.image_spans(b, testing.IMAGE, 2)
    sub = batching.select_rows(b, [0, 2], spans)
    length = int(b["attention_mask"][[0, 2]].sum(-1).max())
    assert sub["input_ids"].shape == (2, length)
    assert torch.equal(sub["input_ids"], b["input_ids"][[0, 2], :length])
    assert torch.equal(sub["advantages"], torch.tensor([0.0, 2.0]))
    assert torch.equal(sub["image_grid_thw"], b["image_grid_thw"][1:3])
    assert torch.equal(sub["pixel_values"], b["pixel_values"][48:124])
    text_only = batching.select_rows(b, [0, 3], spans)
    assert "pixel_values" not in text_only and "image_grid_thw" not in text_only


def test_shared_image_units_group_rows_by_their_images():
    # Rows 0, 2 and 4 show one 6x8 image; row 1 another of the same size; row 3 two images; row 5 none.
    b = testing.make_batch(seed=2, rows=(((6, 8),), ((6, 8),), ((6, 8),), ((4, 10), (6, 6)), ((6, 8),), ()))
    px = b["pixel_values"]
    px[96:144] = px[0:48]  # row 2's image := row 0's
    px[220:268] = px[0:48]  # row 4's image (after row 3's 40 + 36 patches)
    spans = batching.image_spans(b, testing.IMAGE, 2)
    units = sorted(sorted(u) for u in batching.shared_image_units(b, spans))
    assert units == [[0, 2, 4], [1], [3], [5]]
    px[220, 0] += 1.0  # row 4's image now differs in one value
    assert sorted(sorted(u) for u in batching.shared_image_units(b, spans)) == [[0, 2], [1], [3], [4], [5]]
    assert batching.shared_image_units(_batch(), batching.image_spans(_batch(), testing.IMAGE, 2)) is None


def test_scatter_rows_inverts_select_rows():
    b = _batch()
    spans = batching.image_spans(b, testing.IMAGE, 2)
    groups = [[0, 2], [1, 3]]
    parts = [batching.select_rows(b, g, spans)["input_ids"].float() for g in groups]
    full = batching.scatter_rows(parts, groups, *b["input_ids"].shape)
    assert torch.equal(full, b["input_ids"].float() * b["attention_mask"])


def test_bad_batches_are_named():
    b = _batch()
    with pytest.raises(KeyError, match="response_mask"):
        batching.check_batch({k: v for k, v in b.items() if k != "response_mask"})
    bad = dict(b, response_mask=b["attention_mask"].clone())
    with pytest.raises(ValueError, match=r"row 0: response_mask\[:, 0\]"):
        batching.check_batch(bad)
    with pytest.raises(ValueError, match="old_logprob"):
        batching.check_batch(dict(b, old_logprob=torch.zeros(4, 3)))
    short = dict(b, image_grid_thw=b["image_grid_thw"][:1])
    with pytest.raises(ValueError, match="row 2"):
        batching.image_spans(short, testing.IMAGE, 2)
