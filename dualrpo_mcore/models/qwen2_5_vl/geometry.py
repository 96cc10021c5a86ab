"""Index arithmetic of Qwen2.5-VL: mrope position ids for the LM, and the vision tower's patch
positions, window permutation and attention segments.

Everything here is integer bookkeeping on small tensors (CPU is fine); it follows the semantics of
transformers' ``Qwen2_5_VLModel.get_rope_index`` and the vision helpers, written independently.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch


def _image_positions(start: int, grid: Sequence[int], merge: int) -> torch.Tensor:
    """[3, t*h*w/merge^2] (t, h, w) positions of one image's LM tokens, offset by ``start``."""
    t, h, w = int(grid[0]), int(grid[1]) // merge, int(grid[2]) // merge
    tt = torch.arange(t).view(t, 1, 1).expand(t, h, w)
    hh = torch.arange(h).view(1, h, 1).expand(t, h, w)
    ww = torch.arange(w).view(1, 1, w).expand(t, h, w)
    return torch.stack([tt, hh, ww]).reshape(3, -1) + start


def rope_index(input_ids: torch.Tensor, image_grid_thw: Optional[torch.Tensor], image_token_id: int,
               spatial_merge_size: int, attention_mask: Optional[torch.Tensor] = None
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """3D (temporal, height, width) position ids ``[3, B, S]`` and rope deltas ``[B, 1]``.

    Text tokens advance all three axes together; an image's tokens get a (t, h, w) grid starting at
    the current position, after which text resumes at ``start + max(h, w) / merge``. Images are
    consumed in order across the batch (row-major), as their embeddings are. Padding positions
    (``attention_mask == 0``) get 0.
    """
    b, s = input_ids.shape
    pos = torch.zeros(3, b, s, dtype=torch.long)
    deltas = torch.zeros(b, 1, dtype=torch.long)
    grids = image_grid_thw.tolist() if image_grid_thw is not None else []
    next_image = 0
    merge2 = spatial_merge_size ** 2
    for row in range(b):
        valid = attention_mask[row].bool().cpu() if attention_mask is not None else torch.ones(s, dtype=torch.bool)
        ids = input_ids[row].cpu()[valid].tolist()
        pieces: List[torch.Tensor] = []
        cur, i = 0, 0
        while i < len(ids):
            if ids[i] == image_token_id:
                if next_image >= len(grids):
                    raise ValueError(f"row {row}: more image tokens than images in image_grid_thw")
                grid = grids[next_image]
                next_image += 1
                n = int(grid[0] * grid[1] * grid[2]) // merge2
                if ids[i:i + n] != [image_token_id] * n:
                    raise ValueError(f"row {row}: image {next_image - 1} expects {n} image tokens at {i}")
                pieces.append(_image_positions(cur, grid, spatial_merge_size))
                cur += max(int(grid[1]), int(grid[2])) // spatial_merge_size
                i += n
            else:
                j = i
                while j < len(ids) and ids[j] != image_token_id:
                    j += 1
                pieces.append(torch.arange(cur, cur + j - i).view(1, -1).expand(3, -1))
                cur += j - i
                i = j
        if pieces:
            full = torch.cat(pieces, dim=1)
            pos[:, row, valid] = full
            deltas[row, 0] = int(full.max()) + 1 - len(ids)
    if next_image != len(grids):
        raise ValueError(f"image_grid_thw has {len(grids)} images but the batch has tokens for {next_image}")
    return pos.to(input_ids.device), deltas.to(input_ids.device)


def packed_rope_index(input_ids: torch.Tensor, cu_seqlens: torch.Tensor, image_grid_thw: Optional[torch.Tensor],
                      image_token_id: int, spatial_merge_size: int) -> torch.Tensor:
    """[3, 1, T] position ids of a packed stream ``input_ids [1, T]``: :func:`rope_index` of each row
    alone, with its own images (layout: docs/design.md section 5)."""
    ids = input_ids.reshape(-1)
    pos = torch.zeros(3, 1, ids.numel(), dtype=torch.long)
    grids = image_grid_thw.cpu() if image_grid_thw is not None else torch.zeros(0, 3, dtype=torch.long)
    tokens = (grids.prod(-1) // spatial_merge_size ** 2).tolist()
    bounds = [int(c) for c in cu_seqlens.tolist()]
    first = 0
    for r in range(len(bounds) - 1):
        row = ids[bounds[r]:bounds[r + 1]].cpu()
        want, last = int((row == image_token_id).sum()), first
        while want > 0 and last < len(tokens):
            want -= tokens[last]
            last += 1
        if want != 0:
            raise ValueError(f"packed row {r}: its image tokens do not add up to whole images of image_grid_thw "
                             f"(images {first}.. of {len(tokens)})")
        row_pos, _ = rope_index(row[None], grids[first:last] if last > first else None, image_token_id,
                                spatial_merge_size)
        pos[:, 0, bounds[r]:bounds[r + 1]] = row_pos[:, 0]
        first = last
    if first != len(tokens):
        raise ValueError(f"image_grid_thw has {len(tokens)} images but the packed rows have tokens for {first}")
    return pos.to(input_ids.device)


def vision_patch_positions(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """[N, 2] (row, col) of every patch, patches ordered merge-block by merge-block."""
    out = []
    for t, h, w in grid_thw.tolist():
        hh = torch.arange(h).view(h // merge, merge, 1, 1).expand(h // merge, merge, w // merge, merge)
        ww = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, w // merge, merge)
        hh = hh.permute(0, 2, 1, 3).reshape(-1)
        ww = ww.permute(0, 2, 1, 3).reshape(-1)
        out.append(torch.stack([hh, ww], dim=-1).repeat(t, 1))
    return torch.cat(out)


def window_permutation(grid_thw: torch.Tensor, merge: int, window_size: int, patch_size: int
                       ) -> Tuple[torch.Tensor, List[int]]:
    """Order of merged units that makes each attention window contiguous, and window lengths
    (in patches). Windows are ``window_size / merge / patch_size`` merged units on a side; edge
    windows are smaller."""
    win = window_size // merge // patch_size
    if win < 1:
        raise ValueError(f"vision window_size={window_size} is smaller than one merged unit")
    order, lengths, base = [], [], 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        idx = torch.arange(t * gh * gw).view(t, gh, gw)
        for ti in range(t):
            for r0 in range(0, gh, win):
                for c0 in range(0, gw, win):
                    block = idx[ti, r0:r0 + win, c0:c0 + win].reshape(-1)
                    order.append(block + base)
                    lengths.append(block.numel() * merge * merge)
        base += t * gh * gw
    return torch.cat(order), lengths


def segment_lengths(grid_thw: torch.Tensor) -> List[int]:
    """Full-attention segments in patches: one per frame of each image."""
    return [h * w for t, h, w in grid_thw.tolist() for _ in range(t)]


def block_diagonal_mask(lengths: Sequence[int], device=None) -> torch.Tensor:
    """[1, 1, N, N] boolean mask, True where attention is *not* allowed (Megatron's convention)."""
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(list(lengths)))
    seg = seg.to(device) if device is not None else seg
    return (seg[:, None] != seg[None, :])[None, None]


def causal_padding_mask(attention_mask: Optional[torch.Tensor], seq_len: int, batch: int,
                        device=None) -> torch.Tensor:
    """[B, 1, S, S] boolean mask (True = masked): causal, and padded keys masked."""
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).triu(1)
    mask = causal[None, None].expand(batch, 1, seq_len, seq_len)
    if attention_mask is not None:
        pad = ~attention_mask.bool().to(device)
        mask = mask | pad[:, None, None, :]
    return mask.contiguous()
