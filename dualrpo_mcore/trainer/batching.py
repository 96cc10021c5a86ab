"""Cutting an actor batch into micro-batches (rows, trimmed padding, their images).

An actor batch is a dict of right-padded ``[B, S]`` tensors sharing one token axis:

* ``input_ids`` (long), ``attention_mask`` (1 = real token), ``response_mask`` (1 = the token at
  this position was sampled by the policy; its log-prob is taken from the logits one position
  earlier, so column 0 never counts);
* optional per-token ``[B, S]`` float tensors aligned the same way (``old_logprob``,
  ``ref_logprob``, ``rollout_logprob``, per-token ``advantages``) and per-row ``[B]`` tensors
  (``advantages``, ``self_certainty``, ``kl_coef``);
* optional images: ``pixel_values [P, D]`` and ``image_grid_thw [N, 3]`` of every image of every
  row, in row-major order of their ``image_token_id`` runs (as the processor emits them).
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
