"""Cutting an actor batch into micro-batches (rows, trimmed padding, their images).

The batch's fields: docs/design.md section 3.2. This module is the one place that cuts, joins and
shares such batches; :func:`dp_bounds` is the one rule for a data-parallel rank's share of the groups
(docs/design.md section 2.2, "Shares of groups").
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

Batch = Dict[str, Any]
IMAGE_KEYS = ("pixel_values", "image_grid_thw")


def check_batch(batch: Batch) -> Tuple[int, int]:
    """Validate the token-axis tensors; returns ``(B, S)``."""
    for key in ("input_ids", "attention_mask", "response_mask"):
        if key not in batch:
            raise KeyError(f"actor batch is missing {key!r} (has {sorted(batch)})")
    b, s = batch["input_ids"].shape
    for key, val in batch.items():
        if key in IMAGE_KEYS or not torch.is_tensor(val):
            continue
        if val.shape[0] != b or (val.dim() > 1 and val.shape[:2] != (b, s)):
            raise ValueError(f"actor batch field {key!r} has shape {tuple(val.shape)}; expected [{b}] or [{b}, {s}]")
    resp = batch["response_mask"].bool()
    if (resp & ~batch["attention_mask"].bool()).any():
        raise ValueError("actor batch: response_mask marks padding positions (attention_mask 0)")
    if resp[:, 0].any():
        row = int(resp[:, 0].nonzero()[0, 0])
        raise ValueError(f"actor batch row {row}: response_mask[:, 0] is set, but the first token has no "
                         f"prediction (a response needs at least one prompt token before it)")
    return b, s


def shared_image_units(batch: Batch, spans: List[Tuple[int, int, int, int]]) -> Optional[List[List[int]]]:
    """Rows grouped by the images they show (bit-identical; a GRPO group's rows share one), for
    micro-batches that keep such rows together; None when no image repeats. ``spans``: :func:`image_spans`."""
    from dualrpo_mcore.models.qwen2_5_vl.image_dedup import distinct_images

    grids = batch.get("image_grid_thw")
    first = None if grids is None else distinct_images(batch["pixel_values"], grids)
    if first is None:
        return None
    units: Dict[Any, List[int]] = {}
    for r, (g0, g1, _, _) in enumerate(spans):
        units.setdefault(tuple(first[g] for g in range(g0, g1)) or ("no image", r), []).append(r)
    return list(units.values())


def image_spans(batch: Batch, image_token_id: int, merge: int) -> List[Tuple[int, int, int, int]]:
    """Per row ``(first grid, end grid, first patch, end patch)`` into ``image_grid_thw`` / ``pixel_values``."""
    ids = batch["input_ids"]
    grids = batch.get("image_grid_thw")
    if grids is None:
        return [(0, 0, 0, 0)] * ids.shape[0]
    tokens = [int(g.prod()) // merge ** 2 for g in grids]
    patches = [int(g.prod()) for g in grids]
    spans, g, p = [], 0, 0
    for r in range(ids.shape[0]):
        need = int((ids[r] == image_token_id).sum())
        g0, p0 = g, p
        while need > 0:
            if g >= len(tokens):
                raise ValueError(f"actor batch row {r}: more image tokens than image_grid_thw describes")
            need -= tokens[g]
            p += patches[g]
            g += 1
        if need != 0:
            raise ValueError(f"actor batch row {r}: image tokens do not add up to whole images")
        spans.append((g0, g, p0, p))
    if g != len(tokens):
        raise ValueError(f"actor batch: image_grid_thw has {len(tokens)} images, the tokens use {g}")
    return spans


def select_rows(batch: Batch, rows: Sequence[int], spans: List[Tuple[int, int, int, int]]) -> Batch:
    """The sub-batch of ``rows`` (ascending), trimmed to its longest real row, with its images."""
    idx = torch.as_tensor(list(rows), dtype=torch.long)
    length = int(batch["attention_mask"][idx].sum(-1).max().clamp(min=1))
    out: Batch = {}
    for key, val in batch.items():
        if key in IMAGE_KEYS or not torch.is_tensor(val):
            continue
        sub = val[idx]
        out[key] = sub[:, :length].contiguous() if sub.dim() > 1 else sub
    grids = batch.get("image_grid_thw")
    if grids is not None:
        g_parts = [grids[spans[r][0]:spans[r][1]] for r in rows]
        p_parts = [batch["pixel_values"][spans[r][2]:spans[r][3]] for r in rows]
        if sum(x.shape[0] for x in g_parts):
            out["image_grid_thw"] = torch.cat(g_parts)
            out["pixel_values"] = torch.cat(p_parts)
    return out


def scatter_rows(parts: Sequence[torch.Tensor], row_groups: Sequence[Sequence[int]], b: int, s: int) -> torch.Tensor:
    """Inverse of :func:`select_rows` for ``[b_i, s_i]`` per-token results: a zero-padded ``[B, S]``."""
    out = torch.zeros(b, s, dtype=parts[0].dtype if parts else torch.float32)
    for part, rows in zip(parts, row_groups):
        out[torch.as_tensor(list(rows)), : part.shape[1]] = part.detach().to("cpu")
    return out


def collate(rows: List[Dict[str, Any]], pad_id: int) -> Batch:
    """Right-padded actor batch from ``{"prompt": ids, "response": ids, pixel_values, image_grid_thw}``.

    Padded to its longest row only: the actor cuts it into micro-batches trimmed to their own rows,
    and pads each of those for FP8 (``microbatch.pad_tokens``), so a multiple set here would not survive."""
    if not rows:
        raise ValueError("collate: no rows")
    seqs = [torch.cat([r["prompt"], r["response"]]) for r in rows]
    s = max(len(x) for x in seqs)
    b = len(rows)
    ids = torch.full((b, s), pad_id, dtype=torch.long)
    attn = torch.zeros(b, s, dtype=torch.long)
    resp = torch.zeros(b, s, dtype=torch.long)
    for i, (r, x) in enumerate(zip(rows, seqs)):
        ids[i, : len(x)] = x
        attn[i, : len(x)] = 1
        resp[i, len(r["prompt"]): len(x)] = 1
    batch: Batch = dict(input_ids=ids, attention_mask=attn, response_mask=resp)
    imgs = [r for r in rows if r.get("image_grid_thw") is not None]
    if imgs:
        batch["pixel_values"] = torch.cat([r["pixel_values"] for r in imgs])
        batch["image_grid_thw"] = torch.cat([r["image_grid_thw"] for r in imgs])
    return batch


def select(batch: Batch, rows: Sequence[int], image_token_id: int, merge: int) -> Batch:
    """Rows of ``batch`` (with their images), trimmed to their longest row."""
    return select_rows(batch, list(rows), image_spans(batch, image_token_id, merge))


def concat(batches: Sequence[Batch]) -> Batch:
    """Stack batches along rows, right-padding the token axis (pad id 0 is never attended)."""
    if len(batches) == 1:
        return batches[0]
    s = max(b["input_ids"].shape[1] for b in batches)
    out: Batch = {}
    for key, val in batches[0].items():
        if key in IMAGE_KEYS:
            continue
        parts = [b[key] if b[key].dim() == 1 else torch.nn.functional.pad(b[key], (0, s - b[key].shape[1]))
                 for b in batches]
        out[key] = torch.cat(parts)
    imgs = [b for b in batches if b.get("image_grid_thw") is not None]
    if imgs:
        for key in IMAGE_KEYS:
            out[key] = torch.cat([b[key] for b in imgs])
    return out


def flat_groups(reward: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[num_groups]`` bool: all of the group's values are equal (its advantage is 0)."""
    r = reward.view(-1, group_size)
    return (r == r[:, :1]).all(dim=1)


def group_rows(groups: Sequence[int], group_size: int) -> List[int]:
    """The rows of ``groups`` (a GRPO group's rows are contiguous)."""
    return [g * group_size + j for g in groups for j in range(group_size)]


def num_groups(batch: Batch, group_size: int) -> int:
    b = batch["input_ids"].shape[0]
    if b % group_size:
        raise ValueError(f"actor batch has {b} rows, not a multiple of rollout.group_size={group_size}")
    return b // group_size


def dp_bounds(n: int, dp: int) -> List[int]:
    """The one rule for sharing ``n`` groups among ``dp`` ranks (docs/design.md section 2.2): rank r
    takes groups ``[bounds[r], bounds[r + 1])``."""
    if dp < 1 or n < 0:
        raise ValueError(f"dp_bounds: need dp >= 1 and n >= 0, got n={n}, dp={dp}")
    return [n * r // dp for r in range(dp + 1)]


def dp_slice(batch: Batch, group_size: int, image_token_id: int, merge: int,
             dp: int, rank: int) -> Batch:
    """Data-parallel rank ``rank``'s share of the groups (:func:`dp_bounds`), or a *filler* where the
    share is empty (docs/design.md section 2.2)."""
    n = num_groups(batch, group_size)
    if n == 0:
        raise ValueError("dp_slice: the batch has no groups")
    bounds = dp_bounds(n, dp)
    lo, hi = bounds[rank], bounds[rank + 1]
    if lo == hi:
        mine = select(batch, group_rows([0], group_size), image_token_id, merge)
        mine["response_mask"] = torch.zeros_like(mine["response_mask"])
        mine["filler"] = torch.ones(group_size, dtype=torch.bool)
        return mine
    if dp == 1:
        return batch
    return select(batch, group_rows(range(lo, hi), group_size), image_token_id, merge)


def mini_batches(batch: Batch, group_size: int, k: int, image_token_id: int, merge: int):
    """``batch`` in ``k`` contiguous group-aligned parts (fewer if it has fewer groups)."""
    n = num_groups(batch, group_size)
    k = max(1, min(k, n))
    if k == 1:
        yield batch
        return
    for i in range(k):
        yield select(batch, group_rows(range(n * i // k, n * (i + 1) // k), group_size), image_token_id, merge)
