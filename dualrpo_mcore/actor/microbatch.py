"""Token-balanced micro-batches.

RL batches mix short and long responses; a fixed number of rows per micro-batch wastes memory on
some and overflows on others. Rows are instead packed into as few micro-batches as keep every one
at or under ``max_tokens`` real tokens, balancing the totals (longest-processing-time greedy:
rows by decreasing length, each into the currently lightest micro-batch; that is within 4/3 of the
optimal makespan). A row longer than ``max_tokens`` on its own gets a micro-batch to itself.

Under data parallelism every rank must run the same number of micro-batches (the pipeline schedule
and the gradient all-reduce count them), so the caller may force ``num_microbatches`` to the
maximum over ranks (:func:`partition`'s ``min_microbatches``).

FP8 GEMMs need a micro-batch's token count ``B * S`` to be a multiple of the recipe's
``Precision.token_multiple``; :func:`pad_tokens` widens S to the smallest length that gives one.
Widening S rather than adding rows keeps every per-row field (advantages, KL weights, images) as it
is, costs at most ``B * (m / gcd(B, m) - 1)`` tokens, and the new columns sit after every row's last
real token, where causal attention keeps real tokens from ever seeing them; they carry
``attention_mask = 0`` and ``response_mask = 0``, so no loss, statistic or label reads them.
Packed micro-batches (``actor.model.packing``, :mod:`.packed`) are not widened: their stream is padded
to the multiple at its end instead.
"""
from __future__ import annotations

import heapq
import math
from typing import Any, Dict, List, Optional, Sequence

import torch


def _lpt(lengths: Sequence[int], k: int) -> List[List[int]]:
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    heap = [(0, b) for b in range(k)]  # (load, bin id): ties go to the lower id, deterministically
    bins: List[List[int]] = [[] for _ in range(k)]
    for i in order:
        load, b = heapq.heappop(heap)
        bins[b].append(i)
        heapq.heappush(heap, (load + lengths[i], b))
    return bins


def partition(lengths: Sequence[int], max_tokens: int, min_microbatches: int = 1,
              units: Optional[Sequence[Sequence[int]]] = None) -> List[List[int]]:
    """Split row indices ``0..n-1`` into micro-batches of at most ``max_tokens`` tokens each.

    Returns a list of index lists, each sorted ascending, ordered by their first index; no list is
    empty. The count is the smallest ``k >= min_microbatches`` for which the greedy packing fits
    (bounded by ``n``: one row per micro-batch always fits, oversize rows aside).

    ``units`` (a partition of the rows, e.g. the rows that show one image) are kept in one
    micro-batch where they fit, so a micro-batch encodes a shared image once; a unit over
    ``max_tokens`` is cut into runs of its rows that fit, and all units into single rows when there
    are fewer of them than ``min_microbatches``."""
    n = len(lengths)
    if n == 0:
        return []
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if any(x < 0 for x in lengths):
        raise ValueError("row lengths must be >= 0")
    if min_microbatches > n:
        raise ValueError(f"cannot split {n} rows into {min_microbatches} non-empty micro-batches")
    units = _units(lengths, max_tokens, units)
    if len(units) < min_microbatches:
        units = [[i] for i in range(n)]
    sizes = [sum(lengths[i] for i in u) for u in units]
    m = len(units)
    oversize = sum(1 for x in sizes if x > max_tokens)
    k = max(min_microbatches, math.ceil(sum(lengths) / max_tokens), oversize, 1)
    while True:
        bins = _lpt(sizes, min(k, m))
        # A bin may exceed max_tokens only by holding a single oversize row.
        if k >= m or all(sum(sizes[u] for u in b) <= max_tokens or len(b) == 1 for b in bins):
            break
        k += 1
    rows = [sorted(i for u in b for i in units[u]) for b in bins if b]
    return sorted(rows, key=lambda b: b[0])


def _units(lengths: Sequence[int], max_tokens: int, units: Optional[Sequence[Sequence[int]]]) -> List[List[int]]:
    """``units`` checked to cover every row once; one over ``max_tokens`` is cut into runs of its rows
    that fit (a row over the cap on its own is a run)."""
    n = len(lengths)
    if units is None:
        return [[i] for i in range(n)]
    flat = sorted(i for u in units for i in u)
    if flat != list(range(n)):
        raise ValueError(f"units must cover rows 0..{n - 1} exactly once")
    out: List[List[int]] = []
    for u in units:
        piece: List[int] = []
        for i in sorted(u):  # an oversize unit becomes runs of its rows that fit, not single rows
            if piece and sum(lengths[j] for j in piece) + lengths[i] > max_tokens:
                out.append(piece)
                piece = []
            piece.append(i)
        if piece:
            out.append(piece)
    return out


def padded_length(rows: int, length: int, multiple: int) -> int:
    """The smallest ``S >= length`` with ``rows * S`` a multiple of ``multiple``."""
    if rows < 1 or multiple < 1:
        raise ValueError(f"rows and multiple must be >= 1 (got {rows}, {multiple})")
    step = multiple // math.gcd(rows, multiple)
    return -(-length // step) * step


def pad_tokens(mb: Dict[str, Any], multiple: int, image_keys: Sequence[str] = ("pixel_values", "image_grid_thw")
               ) -> Dict[str, Any]:
    """``mb`` with every ``[B, S]`` field right-padded with zeros to :func:`padded_length` columns.

    Zeros mean: attention and response masks off, log-probs/advantages 0 (never read), and token id
    0 for ``input_ids``, which must not be the image token (the model counts image tokens over the
    whole tensor). Per-row ``[B]`` fields and images are returned as they are."""
    b, s = mb["input_ids"].shape
    extra = padded_length(b, s, multiple) - s
    if extra == 0:
        return mb
    out = dict(mb)
    for key, val in mb.items():
        if key in image_keys or not torch.is_tensor(val) or val.dim() < 2 or tuple(val.shape[:2]) != (b, s):
            continue
        out[key] = torch.cat([val, val.new_zeros(b, extra, *val.shape[2:])], dim=1)
    return out
