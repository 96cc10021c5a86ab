"""Pure-torch implementation of the per-shard partials and of the logits gradient.

Same semantics and the same partial layout as the C++/CUDA kernels in ``csrc/`` (see
``token_stats.py`` for the layout and the derivation), so the merge code is shared. It is the
fallback where the compiled extension is missing, and the float64 path that gradcheck uses.
Rows are processed in chunks so that its extra memory stays bounded for long sequences.
"""
from __future__ import annotations

from typing import Optional

import torch

# Rows per chunk: bounds the fp32 temporaries to a few [CHUNK, V_local] tensors.
CHUNK_ROWS = 256


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs (gradcheck), float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _finite_or_zero(t: torch.Tensor) -> torch.Tensor:
    # A row whose real logits are all -inf has max -inf; shift by 0 there so that x - m stays -inf
    # (exp -> 0) instead of becoming nan.
    return torch.where(torch.isfinite(t), t, torch.zeros_like(t))


def partials(logits: torch.Tensor, labels: torch.Tensor, ref: Optional[torch.Tensor],
             vocab_start: int, n_real: int, inv_t: float) -> torch.Tensor:
    """Per-row partials of this shard: ``[T, 6]`` (m, S, A, B, y, n) or ``[T, 9]`` (+ mr, Sr, C)."""
    acc = acc_dtype(logits.dtype)
    rows = logits.shape[0]
    k = 6 if ref is None else 9
    out = torch.empty(rows, k, dtype=acc, device=logits.device)
    for s in range(0, rows, CHUNK_ROWS):
        e_ = min(rows, s + CHUNK_ROWS)
        out[s:e_] = _partials_chunk(logits[s:e_], labels[s:e_], None if ref is None else ref[s:e_],
                                    vocab_start, n_real, inv_t, acc)
    return out


def _partials_chunk(z, labels, ref, vocab_start, n_real, inv_t, acc):
    rows = z.shape[0]
    x = z[:, :n_real].to(acc) * inv_t
    if n_real > 0:
        m = x.amax(dim=1)
    else:
        m = torch.full((rows,), float("-inf"), dtype=acc, device=z.device)
    d = x - _finite_or_zero(m)[:, None]
    e = torch.exp(d)
    live = e > 0
    zero = torch.zeros((), dtype=acc, device=z.device)
    # B relative to the max (d.sum), not x.sum(): see the merge in token_stats.py.
    cols = [m, e.sum(1), torch.where(live, e * d, zero).sum(1), d.sum(1)]
    local = labels - vocab_start
    owned = (local >= 0) & (local < n_real)
    idx = torch.where(owned, local, torch.zeros_like(local))
    y = x.gather(1, idx[:, None])[:, 0] if n_real > 0 else torch.zeros(rows, dtype=acc, device=z.device)
    cols.append(torch.where(owned, y, zero))
    cols.append(torch.full((rows,), float(n_real), dtype=acc, device=z.device))
    if ref is not None:
        xr = ref[:, :n_real].to(acc) * inv_t
        mr = xr.amax(dim=1) if n_real > 0 else torch.full_like(m, float("-inf"))
        dr = xr - _finite_or_zero(mr)[:, None]
        cols += [mr, torch.exp(dr).sum(1), torch.where(live, e * (d - dr), zero).sum(1)]
    return torch.stack(cols, dim=1)


def grad_logits(logits: torch.Tensor, labels: torch.Tensor, ref: Optional[torch.Tensor],
                stats: torch.Tensor, grads: torch.Tensor, vocab_start: int, n_real: int,
                vocab_size: int, inv_t: float) -> torch.Tensor:
    """d loss / d logits for this shard; padding columns get 0. See token_stats.py for the formula."""
    acc = acc_dtype(logits.dtype)
    out = torch.zeros_like(logits)
    for s in range(0, logits.shape[0], CHUNK_ROWS):
        e_ = min(logits.shape[0], s + CHUNK_ROWS)
        g = _grad_chunk(logits[s:e_], labels[s:e_], None if ref is None else ref[s:e_],
                        stats[s:e_], grads[s:e_], vocab_start, n_real, vocab_size, inv_t, acc)
        out[s:e_, :n_real] = g.to(logits.dtype)
    return out


def _grad_chunk(z, labels, ref, stats, grads, vocab_start, n_real, vocab_size, inv_t, acc):
    st = stats.to(acc)
    gr = grads.to(acc)
    big_m, log_s, hbar = st[:, 0:1], st[:, 1:2], st[:, 2:3]
    c, g_h, g_sc = gr[:, 0:1], gr[:, 1:2], gr[:, 2:3]
    d = z[:, :n_real].to(acc) * inv_t - big_m
    p = torch.exp(d - log_s)
    live = p > 0
    zero = torch.zeros((), dtype=acc, device=z.device)
    g = -c * p - g_h * torch.where(live, p * (d - hbar), zero) + g_sc * (p - 1.0 / vocab_size)
    if ref is not None:
        dr = ref[:, :n_real].to(acc) * inv_t - st[:, 3:4]
        g = g + gr[:, 3:4] * torch.where(live, p * ((d - dr) - st[:, 4:5]), zero)
    local = labels - vocab_start
    owned = (local >= 0) & (local < n_real)
    if n_real > 0:  # + c at the label's column, where this shard owns it (no data-dependent branch)
        idx = torch.where(owned, local, torch.zeros_like(local))[:, None]
        g = g.scatter_add(1, idx, torch.where(owned[:, None], c, zero))
    return g * inv_t
