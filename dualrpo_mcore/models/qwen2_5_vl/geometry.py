"""Index arithmetic of Qwen2.5-VL: mrope position ids for the LM, and the vision tower's patch
positions, window permutation and attention segments.

Everything here is integer bookkeeping on small tensors (CPU is fine); it follows the semantics of
transformers' ``Qwen2_5_VLModel.get_rope_index`` and the vision helpers, written independently.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch


def _row_positions(ids: torch.Tensor, row: torch.Tensor, rows: int, grids: torch.Tensor, image_token_id: int,
                   merge: int, names: Tuple[str, str]) -> Tuple[torch.Tensor, torch.Tensor]:
    """mrope positions ``[3, N]`` of ``N`` real tokens laid out row after row (``row [N]``: each token's row,
    non-decreasing, of ``rows``), and each row's rope delta ``[rows]``; ``grids [K, 3]`` are the images in
    the order of their token runs. In tensor ops, not a Python loop over tokens (4% of a tiny CPU step).

    Text tokens advance all three axes together; image k's ``n_k`` tokens get its (t, h, w) grid from the
    row's current position, after which text resumes at that position plus ``max(h, w) / merge``. So a
    token's position is its row's text tokens before it plus ``max(h, w) / merge`` of the row's images that
    ended before it. ``names``: how errors name a row and the whole ("row", "the batch has")."""
    n = ids.numel()
    hm, wm = grids[:, 1] // merge, grids[:, 2] // merge
    per = grids[:, 0] * hm * wm
    ends = per.cumsum(0)
    at = ends - per  # each image's first index among the image tokens
    image = ids == image_token_id
    where = image.nonzero().squeeze(1)  # stream index of each image token
    m = where.numel()
    k = torch.searchsorted(ends, torch.arange(m), right=True)  # each image token's image
    starts = torch.searchsorted(row, torch.arange(rows))  # each row's first token
    if bool((k >= len(grids)).any()):
        extra = int(where[int(ends[-1]) if len(ends) else 0])
        raise ValueError(f"{names[0]} {int(row[extra])}: more image tokens than images in image_grid_thw")
    # Every begun image's tokens lie back to back in one row, all of them.
    first = where[at[k]]
    broken = (where != first + torch.arange(m) - at[k]) | (row[where] != row[first])
    begun = int(k[-1]) + 1 if m else 0
    if bool(broken.any()) or (m and m < int(ends[begun - 1])):
        img = int(k[broken.nonzero()[0, 0]]) if bool(broken.any()) else begun - 1
        f = int(where[at[img]])
        raise ValueError(f"{names[0]} {int(row[f])}: image {img} expects {int(per[img])} image tokens at "
                         f"{f - int(starts[row[f]])}")
    if begun != len(grids):
        raise ValueError(f"image_grid_thw has {len(grids)} images but {names[1]} tokens for {begun}")
    text = (~image).long()
    before = text.cumsum(0) - text  # text tokens before each token, in the whole stream
    bump = torch.zeros(n + 1, dtype=torch.long)
    if len(grids):
        bump.index_add_(0, where[at] + per, torch.maximum(hm, wm))  # at the token after each image
    bump = bump.cumsum(0)[:n]  # max(h, w) / merge of every image ended before each token
    cur = before + bump
    cur = cur - cur[starts.clamp(max=max(n - 1, 0))][row]  # from the row's own start
    pos = cur.expand(3, n).clone()
    if m:
        j, plane = torch.arange(m) - at[k], (hm * wm)[k]
        pos[:, where] = cur[first] + torch.stack([j // plane, j % plane // wm[k], j % wm[k]])
    top = torch.full((rows,), -1, dtype=torch.long).scatter_reduce(0, row, pos.amax(0), "amax")
    count = torch.bincount(row, minlength=rows)
    deltas = torch.where(count > 0, top + 1 - count, torch.zeros_like(count))
    return pos, deltas


def rope_index(input_ids: torch.Tensor, image_grid_thw: Optional[torch.Tensor], image_token_id: int,
               spatial_merge_size: int, attention_mask: Optional[torch.Tensor] = None
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """3D (temporal, height, width) position ids ``[3, B, S]`` and rope deltas ``[B, 1]`` of a padded batch
    (the rule: :func:`_row_positions`). Images are consumed in order across the batch (row-major), as their
    embeddings are. Padding positions (``attention_mask == 0``) get 0."""
    b, s = input_ids.shape
    valid = attention_mask.bool().cpu() if attention_mask is not None else torch.ones(b, s, dtype=torch.bool)
    grids = image_grid_thw.cpu().long() if image_grid_thw is not None else torch.zeros(0, 3, dtype=torch.long)
    row = torch.arange(b)[:, None].expand(b, s)[valid]
    got, deltas = _row_positions(input_ids.cpu()[valid], row, b, grids, image_token_id, spatial_merge_size,
                                 ("row", "the batch has"))
    pos = torch.zeros(3, b, s, dtype=torch.long)
    pos[:, valid] = got
    return pos.to(input_ids.device), deltas[:, None].to(input_ids.device)


def packed_rope_index(input_ids: torch.Tensor, cu_seqlens: torch.Tensor, image_grid_thw: Optional[torch.Tensor],
                      image_token_id: int, spatial_merge_size: int) -> torch.Tensor:
    """[3, 1, T] position ids of a packed stream ``input_ids [1, T]``: :func:`rope_index` of each row
    alone, with its own images (layout: docs/design.md section 5)."""
    ids = input_ids.reshape(-1).cpu()
    cu = cu_seqlens.cpu().long()
    grids = image_grid_thw.cpu().long() if image_grid_thw is not None else torch.zeros(0, 3, dtype=torch.long)
    rows = cu.numel() - 1
    row = torch.repeat_interleave(torch.arange(rows), cu[1:] - cu[:-1])
    got, _ = _row_positions(ids[:int(cu[-1])], row, rows, grids, image_token_id, spatial_merge_size,
                            ("packed row", "the packed rows have"))
    pos = torch.zeros(3, 1, ids.numel(), dtype=torch.long)
    pos[:, 0, :got.shape[1]] = got
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
