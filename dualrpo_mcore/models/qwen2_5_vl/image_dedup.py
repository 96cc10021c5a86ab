"""Run the vision tower once per distinct image in a batch.

GRPO puts the G responses of one prompt in the batch as G rows that all carry the prompt's image, so the
actor's forwards (old-policy statistics, reference, update) would encode each image G times. Encoding
each image once and copying its embeddings to every row that shows it gives the same numbers: the ViT
sees each image alone (its attention never crosses images), and in backward ``index_select`` sums
the copies' gradients into the one encoding, which is what G separate encodings would have added up to.

Images are matched by content, not by position in the batch: a batch built any other way (SFT rows,
a reference forward over a mixed batch) is only ever deduplicated where the pixels are bit-identical.
"""
from __future__ import annotations

import itertools
from typing import Dict, List, Optional, Tuple

import torch


def distinct_images(pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> Optional[List[int]]:
    """For each image, the index of the first image with the same grid and bit-identical patches;
    None when no image repeats (the caller then encodes the batch as it is).

    ``pixel_values`` holds the images' patches one after another (``[sum t*h*w, patch_dim]``) and
    ``grid_thw`` one ``(t, h, w)`` row per image, as the Qwen2.5-VL processor writes them."""
    counts = grid_thw.prod(dim=-1)
    if counts.numel() < 2:
        return None
    if int(counts.sum()) != pixel_values.shape[0]:
        raise ValueError(f"image_grid_thw covers {int(counts.sum())} patches but pixel_values has "
                         f"{pixel_values.shape[0]}")
    spans = torch.split(pixel_values.detach(), counts.tolist())
    # A checksum per image; only images that agree on it and on their grid are compared in full. Each
    # is its own reduction (no float64 copy of the pixels; no atomics, whose order could make two
    # copies of one image sum differently on a GPU).
    sums = torch.stack([span.sum(dtype=torch.float64) for span in spans]).tolist()
    grids = [tuple(g) for g in grid_thw.tolist()]
    seen: Dict[Tuple, List[int]] = {}
    first: List[int] = []
    for i, span in enumerate(spans):
        key = (grids[i], sums[i])
        match = next((j for j in seen.get(key, ()) if torch.equal(spans[j], span)), None)
        if match is None:
            seen.setdefault(key, []).append(i)
            match = i
        first.append(match)
    return None if all(j == i for i, j in enumerate(first)) else first


def encode_once(vision, pixel_values: torch.Tensor, grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """``vision(pixel_values, grid_thw)`` (image tokens of every image, in order), computing each
    distinct image once."""
    first = distinct_images(pixel_values, grid_thw)
    if first is None:
        return vision(pixel_values, grid_thw)
    counts = grid_thw.prod(dim=-1).tolist()
    spans = torch.split(pixel_values, counts)
    keep = sorted(set(first))
    encoded = vision(torch.cat([spans[j] for j in keep]), grid_thw[keep])
    tokens = [c // merge ** 2 for c in counts]
    start = dict(zip(keep, itertools.accumulate((tokens[j] for j in keep), initial=0)))
    index = torch.cat([torch.arange(start[j], start[j] + tokens[j]) for j in first]).to(encoded.device)
    return encoded.index_select(0, index)
