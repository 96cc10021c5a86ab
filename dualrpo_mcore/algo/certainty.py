"""Self-certainty, equation (1) of docs/design.md (its shifted evaluation form, why, and the dtype
rule), and the masked-mean helper the rest of ``algo`` shares.

The shifted form is non-negative in floating point too, not only in exact arithmetic: after the
shift every entry is <= 0 (rounding is monotone, so the max maps to exactly 0), hence the second
term is >= 0 and the first lies in [-log V, 0]. This is the plain-torch reference; the fused,
vocab-sharded version lives in ``ops.token_stats``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["compute_dtype", "masked_mean", "masked_sum", "token_self_certainty", "self_certainty"]


def compute_dtype(t: Tensor) -> torch.dtype:
    """float64 stays float64; every other dtype (bf16, fp16, fp32, ints, bool) is computed in fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _as_weight(mask: Tensor, like: Tensor) -> Tensor:
    if mask.shape != like.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match values {tuple(like.shape)}")
    return mask.to(device=like.device, dtype=like.dtype)


def masked_sum(x: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """Sum of ``x * mask``; positions with mask 0 never contribute, even if ``x`` is NaN/inf there.

    Padding positions often hold garbage (e.g. logits of pad tokens), and ``nan * 0`` is NaN, so the
    mask selects with ``where`` before it weights.
    """
    w = _as_weight(mask, x)
    picked = torch.where(w != 0, x * w, torch.zeros((), dtype=x.dtype, device=x.device))
    return picked.sum() if dim is None else picked.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: Optional[int] = None, empty_value: float = 0.0) -> Tensor:
    """Weighted mean ``sum(x * mask) / sum(mask)`` over ``dim`` (all elements when ``dim`` is None).

    ``mask`` is a 0/1 (or non-negative weight) tensor of ``x``'s shape. Where the mask sums to 0 the
    result is ``empty_value`` (default 0) rather than NaN, so an empty response or an all-padding
    micro-batch cannot poison a loss or a metric.
    """
    w = _as_weight(mask, x)
    num = masked_sum(x, w, dim)
    den = w.sum() if dim is None else w.sum(dim)
    safe = torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(den > 0, num / safe, torch.full_like(num, empty_value))


def token_self_certainty(logits: Tensor, *, temperature: float = 1.0,
                         vocab_size: Optional[int] = None) -> Tensor:
    """Per-token self-certainty ``sc_t`` for logits ``[..., V]``; returns ``[...]`` (fp32 or fp64).

    ``temperature`` divides the logits first (p = softmax(z / T), docs/design.md section 1);
    ``vocab_size`` keeps only the first ``vocab_size`` columns (the real tokens) when the logits
    carry padding columns. Differentiable w.r.t. ``logits``.
    """
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be [..., V] with V >= 1, got shape {tuple(logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if vocab_size is not None:
        if not 1 <= vocab_size <= logits.shape[-1]:
            raise ValueError(f"vocab_size {vocab_size} outside [1, {logits.shape[-1]}] (logits columns)")
        logits = logits[..., :vocab_size]
    z = logits.to(compute_dtype(logits))
    if temperature != 1.0:
        z = z / temperature
    shifted = z - z.amax(dim=-1, keepdim=True).detach()
    return torch.log(torch.exp(shifted).mean(dim=-1)) - shifted.mean(dim=-1)


def self_certainty(logits: Tensor, mask: Optional[Tensor] = None, *, temperature: float = 1.0,
                   vocab_size: Optional[int] = None) -> Tensor:
    """Self-certainty ``u`` of each response: the mean of ``sc_t`` over its response tokens.

    Args:
        logits: ``[..., T, V]``, V real tokens (or pass ``vocab_size`` to drop padding columns).
        mask: ``[..., T]``, 1 on response tokens, 0 on prompt/padding; None means every token.
        temperature, vocab_size: as in :func:`token_self_certainty`.

    Returns:
        ``[...]`` in float32 (float64 for float64 logits), >= 0; larger means more confident.
        A sequence with no masked tokens gets 0 (eq. 1 of docs/design.md says why).
    """
    if logits.dim() < 2:
        raise ValueError(f"logits must be [..., T, V], got shape {tuple(logits.shape)}")
    sc = token_self_certainty(logits, temperature=temperature, vocab_size=vocab_size)
    if mask is None:
        mask = torch.ones_like(sc)
    elif mask.shape != sc.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal logits.shape[:-1] = {tuple(sc.shape)}")
    return masked_mean(sc, mask, dim=-1)
