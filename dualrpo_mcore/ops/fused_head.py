r"""The output layer fused with the token statistics: logits are never stored.

How it works (forward, backward, chunk size, the mask) and what it returns: docs/fused_head.md.
Beyond that page: the reference gets no gradient; a half-precision dW is summed in fp32
with one rounding per chunk product, not per running sum (none for a single chunk); forward cuts
the same chunks as backward because a BLAS may round a row differently in a GEMM of another height,
and the logits that backward recomputes must be bitwise the ones whose (max, log-sum) forward
saved; labels of -100 inside the mask behave as in ``token_stats`` (log-prob 0, entropy and
self-certainty computed).
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.distributed as dist

from . import _ext, _fallback
from .token_stats import TokenStats, _all_gather, autograd_outputs, check_range, grad_columns, merge, shard_sizes

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 512 * 2**20
"""Default memory budget of one chunk (docs/fused_head.md): ~440 rows at V_local = 151936 in fp32.
Measured on the 2-core CPU: a 220-row chunk's GEMMs cost 1.11x those of 1760-row ones, 440 rows
1.02x (docs/fused_head.md); a GPU's GEMMs reach full rate at fewer rows."""


def chunk_rows(chunk_bytes: int, n_cols: int, dtype: torch.dtype, with_ref: bool = False) -> int:
    """Token rows per chunk so that backward's chunk-sized tensors fit in ``chunk_bytes``."""
    if chunk_bytes <= 0:
        raise ValueError(f"fused_head: chunk_bytes must be > 0, got {chunk_bytes}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    half = dtype in (torch.bfloat16, torch.float16)
    tensors = 2 + int(with_ref) + int(half)  # logits, dz, [ref logits], [dW product block]
    return max(1, int(chunk_bytes) // max(1, n_cols * itemsize * tensors))


# --- the pure-torch loop (no compiled extension, or float64 on a GPU) ---------------------------

def _torch_partials(h, w, labels, rh, rw, vocab_start, n_real, vocab_size, inv_t, rows_per_chunk):
    acc = _fallback.acc_dtype(h.dtype)
    wr, rwr = w[:n_real], None if rw is None else rw[:n_real]
    out = torch.empty(h.shape[0], 6 if rh is None else 9, dtype=acc, device=h.device)
    for lo in range(0, h.shape[0], rows_per_chunk):
        hi = min(h.shape[0], lo + rows_per_chunk)
        z = h[lo:hi] @ wr.t()
        zr = None if rh is None else rh[lo:hi] @ rwr.t()
        out[lo:hi] = _fallback.partials(z, labels[lo:hi], zr, vocab_start, n_real, inv_t)
    return out


def _torch_grad(h, w, labels, rh, rw, stats, grads, vocab_start, n_real, vocab_size, inv_t, rows_per_chunk,
               need_dw=True):
    half = w.dtype in (torch.bfloat16, torch.float16) and h.shape[0] > rows_per_chunk  # as in csrc/
    wr, rwr = w[:n_real], None if rw is None else rw[:n_real]
    dh = torch.empty_like(h)
    dw = torch.zeros(w.shape if need_dw else (0,), dtype=torch.float32 if half else w.dtype, device=w.device)
    for lo in range(0, h.shape[0], rows_per_chunk):
        hi = min(h.shape[0], lo + rows_per_chunk)
        z = h[lo:hi] @ wr.t()
        zr = None if rh is None else rh[lo:hi] @ rwr.t()
        dz = _fallback.grad_logits(z, labels[lo:hi], zr, stats[lo:hi], grads[lo:hi], vocab_start, n_real,
                                   vocab_size, inv_t)
        del z, zr  # as in csrc/: the chunk's logits go before dz's GEMMs, and dz before the next chunk
        dh[lo:hi] = dz @ wr
        if need_dw:
            dw[:n_real] += (dz.t() @ h[lo:hi]).to(dw.dtype)
        del dz
    return dh, dw.to(w.dtype)


def _has_head_ops() -> bool:
    try:
        torch.ops.dualrpo.head_partials  # noqa: B018  (attribute lookup resolves the operator)
        return True
    except (AttributeError, RuntimeError):
        return False


def _choose(device, backend, dtype) -> str:
    chosen = _ext.choose(device, backend, dtype)
    if chosen == "ext" and not _has_head_ops():
        msg = ("the compiled extension predates the fused head (no torch.ops.dualrpo.head_partials); "
               "rebuild with `pip install --no-build-isolation -e .`")
        if (backend or "auto") == "ext":
            raise RuntimeError(f"fused_head backend 'ext': {msg}")
        log.warning("fused_head: %s; using the pure-torch loop", msg)
        return "torch"
    return chosen


def _ops(backend: str):
    if backend == "ext":
        return torch.ops.dualrpo.head_partials, torch.ops.dualrpo.head_grad
    return _torch_partials, _torch_grad


# --- autograd ----------------------------------------------------------------------------------

class _FusedHeadFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ref_h, ref_w, args):
        vocab_start, n_real, vocab_size, inv_t, rows, group, backend = args
        partials_op, grad_op = _ops(backend)
        parts = partials_op(hidden, weight, labels, ref_h, ref_w, vocab_start, n_real, vocab_size, inv_t, rows)
        outs, stats = merge(_all_gather(parts, group), labels, vocab_size)
        ctx.save_for_backward(hidden, weight, labels, ref_h, ref_w, stats.to(_fallback.acc_dtype(hidden.dtype)))
        ctx.args = args
        ctx.grad_op = grad_op
        ctx.mark_non_differentiable(labels)
        return autograd_outputs(*outs, like=hidden)

    @staticmethod
    def backward(ctx, g_lp, g_h, g_sc, g_kl):
        hidden, weight, labels, ref_h, ref_w, stats = ctx.saved_tensors
        vocab_start, n_real, vocab_size, inv_t, rows, group, _ = ctx.args
        grads = grad_columns(labels, g_lp, g_h, g_sc, g_kl, ref_h is not None, stats.dtype)
        need_dw = ctx.needs_input_grad[1]  # a frozen weight costs no third GEMM
        dh, dw = ctx.grad_op(hidden, weight, labels, ref_h, ref_w, stats, grads, vocab_start, n_real,
                             vocab_size, inv_t, rows, need_dw)
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(dh, group=group)  # each shard saw only its part of the vocabulary
        return (dh if ctx.needs_input_grad[0] else None, dw if need_dw else None,
                None, None, None, None)


def _check(hidden, weight, labels, mask, ref_hidden, ref_weight, temperature, vocab_start, vocab_size):
    if hidden.dim() != 2 or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"fused_head: need hidden [T, H] and weight [V_local, H], got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"fused_head: hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(f"fused_head: dtype {hidden.dtype} not supported")
    if labels.shape != hidden.shape[:1] or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"fused_head: labels must be int64/int32 [T={hidden.shape[0]}], got "
                         f"{labels.dtype} {tuple(labels.shape)}")
    if mask is not None and mask.shape != hidden.shape[:1]:
        raise ValueError(f"fused_head: mask must be [T={hidden.shape[0]}], got {tuple(mask.shape)}")
    if (ref_hidden is None) != (ref_weight is None):
        raise ValueError("fused_head: give both ref_hidden and ref_weight, or neither")
    if ref_hidden is not None and (ref_hidden.shape[0] != hidden.shape[0] or ref_weight.shape[0] != weight.shape[0]
                                   or ref_hidden.dtype != hidden.dtype or ref_weight.dtype != hidden.dtype):
        raise ValueError(f"fused_head: the reference needs hidden [T={hidden.shape[0]}, H_ref] and weight "
                         f"[V_local={weight.shape[0]}, H_ref] in {hidden.dtype}, got {tuple(ref_hidden.shape)} "
                         f"{ref_hidden.dtype} and {tuple(ref_weight.shape)} {ref_weight.dtype}")
    check_range("fused_head", labels, temperature, vocab_start, vocab_size, mask)


def _checked(hidden, weight, labels, mask, ref_hidden, ref_weight, temperature, vocab_start, vocab_size, group):
    """(vocab_size, n_real, int64 labels) after the checks (``shard_sizes`` of the weight's rows)."""
    vocab_size, n_real = shard_sizes(weight.shape[0], vocab_start, vocab_size, group)
    _check(hidden, weight, labels, mask, ref_hidden, ref_weight, temperature, vocab_start, vocab_size)
    return vocab_size, n_real, labels.long()


def fused_head(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
               mask: Optional[torch.Tensor] = None, temperature: float = 1.0, vocab_start: int = 0,
               vocab_size: Optional[int] = None, group=None, ref_hidden: Optional[torch.Tensor] = None,
               ref_weight: Optional[torch.Tensor] = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
               backend: Optional[str] = None) -> TokenStats:
    """Token statistics of ``hidden @ weight.T`` without storing the logits (docs/fused_head.md).

    ``group``, ``vocab_size``, ``labels``, ``temperature`` and ``backend`` mean what they mean for
    ``token_stats``; ``ref_hidden [T, H_ref]`` + ``ref_weight [V_local, H_ref]`` add ``out.kl``.
    """
    vocab_size, n_real, labels = _checked(hidden, weight, labels, mask, ref_hidden, ref_weight, temperature,
                                          vocab_start, vocab_size, group)
    rows_total = hidden.shape[0]
    idx = None
    if mask is not None:
        idx = torch.nonzero(mask.bool(), as_tuple=False)[:, 0]
        hidden, labels = hidden.index_select(0, idx), labels.index_select(0, idx)
        if ref_hidden is not None:
            ref_hidden = ref_hidden.index_select(0, idx)
    with_ref = ref_hidden is not None
    rows = min(max(1, hidden.shape[0]), chunk_rows(chunk_bytes, max(1, n_real), hidden.dtype, with_ref))
    chosen = _choose(hidden.device, backend, hidden.dtype)
    if with_ref:
        ref_hidden, ref_weight = ref_hidden.detach(), ref_weight.detach()
    args = (int(vocab_start), int(n_real), int(vocab_size), 1.0 / float(temperature), int(rows), group, chosen)
    lp, h, sc, kl = _FusedHeadFn.apply(hidden, weight, labels, ref_hidden, ref_weight, args)
    outs = [lp, h, sc] + ([kl] if with_ref else [])
    if idx is not None:  # back to all T rows; the unmasked ones hold 0 and pass no gradient
        outs = [o.new_zeros(rows_total).index_copy(0, idx, o) for o in outs]
    return TokenStats(outs[0], outs[1], outs[2], outs[3] if with_ref else None)
