"""Encoding each distinct image once (``models.qwen2_5_vl.image_dedup``).

References: a brute-force pairwise comparison for which images repeat, and the vision function run on
every image as given for the embeddings and their gradients."""
import pytest
import torch

from dualrpo_mcore.models.qwen2_5_vl.image_dedup import distinct_images, encode_once

DIM, MERGE = 6, 2


def _images(grids, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t * h * w, DIM, generator=g, dtype=torch.float64) for t, h, w in grids]


def _pack(spans, grids):
    return torch.cat(spans), torch.tensor(grids)


def _brute_force_first(spans, grids):
    return [next(j for j in range(i + 1) if grids[j] == grids[i] and torch.equal(spans[j], spans[i]))
            for i in range(len(spans))]


def test_repeats_are_found_by_content_and_grid():
    a, b, c = _images([(1, 2, 4), (1, 2, 4), (1, 4, 2)])
    permuted = a.flip(0)  # same checksum as a, different image
    reshaped = a.clone()  # same patches as a under another grid
    spans = [a, b, a.clone(), permuted, c, reshaped, b.clone(), a.clone()]
    grids = [(1, 2, 4), (1, 2, 4), (1, 2, 4), (1, 2, 4), (1, 4, 2), (1, 4, 2), (1, 2, 4), (1, 2, 4)]
    pixels, grid = _pack(spans, grids)
    assert distinct_images(pixels, grid) == _brute_force_first(spans, grids) == [0, 1, 0, 3, 4, 5, 1, 0]


def test_one_changed_value_is_a_different_image():
    (a,) = _images([(1, 2, 2)])
    near = a.clone()
    near[3, 1] = torch.nextafter(near[3, 1], torch.tensor(float("inf"), dtype=near.dtype))
    pixels, grid = _pack([a, near], [(1, 2, 2)] * 2)
    assert distinct_images(pixels, grid) is None


def test_nothing_to_do_without_repeats_or_with_one_image():
    spans = _images([(1, 2, 2), (1, 2, 4)])
    assert distinct_images(*_pack(spans, [(1, 2, 2), (1, 2, 4)])) is None
    assert distinct_images(*_pack(spans[:1], [(1, 2, 2)])) is None


def test_grid_and_pixels_must_agree():
    (a,) = _images([(1, 2, 2)])
    with pytest.raises(ValueError, match="covers 8 patches but pixel_values has 4"):
        distinct_images(a, torch.tensor([[1, 2, 2], [1, 2, 2]]))


class _Vision(torch.nn.Module):
    """Per-image encoder with a cross-patch step (mean over the image), merge x merge patches -> 1 token."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w = torch.nn.Parameter(torch.randn(DIM * MERGE ** 2, 5, generator=g, dtype=torch.float64))
        self.calls = []

    def forward(self, pixels, grid):
        self.calls.append(int(pixels.shape[0]))
        out = []
        for span in torch.split(pixels, grid.prod(-1).tolist()):
            x = torch.tanh(span + span.mean(0))
            out.append(x.reshape(-1, DIM * MERGE ** 2) @ self.w)
        return torch.cat(out)


def test_embeddings_and_gradients_equal_encoding_every_copy():
    a, b, c = _images([(1, 2, 4), (1, 4, 4), (1, 2, 2)], seed=1)
    spans = [a, b, a.clone(), c, a.clone(), b.clone()]
    grids = [(1, 2, 4), (1, 4, 4), (1, 2, 4), (1, 2, 2), (1, 2, 4), (1, 4, 4)]
    pixels, grid = _pack(spans, grids)
    weights = torch.randn(sum(t * h * w for t, h, w in grids) // MERGE ** 2, 5,
                          generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    results = []
    for once in (True, False):
        vision = _Vision()
        x = pixels.clone().requires_grad_(True)
        out = encode_once(vision, x, grid, MERGE) if once else vision(x, grid)
        (out * weights).sum().backward()
        results.append((out.detach(), vision.w.grad, x.grad, vision.calls))
    (got, got_w, got_x, calls), (want, want_w, want_x, _) = results
    assert calls == [8 + 16 + 4]  # each distinct image encoded once
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(got_w, want_w, rtol=1e-12, atol=1e-12)
    # Pixels are data, but their gradient shows the bookkeeping: each image's first copy carries the sum of
    # what all its copies would get.
    first = distinct_images(pixels, grid)
    pieces = torch.split(got_x, grid.prod(-1).tolist())
    summed = [sum(p for p, f in zip(torch.split(want_x, grid.prod(-1).tolist()), first) if f == j) for j in (0, 1, 3)]
    torch.testing.assert_close(torch.cat([pieces[j] for j in (0, 1, 3)]), torch.cat(summed), rtol=1e-12, atol=1e-12)
