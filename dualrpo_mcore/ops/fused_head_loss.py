r"""The output layer, the token statistics and the loss in one pass: gradients formed in the forward.

What it computes, why (no recompute: three GEMMs, as unfused), which losses qualify (token-separable
ones) and its collectives: docs/fused_head.md, "The loss path". Beyond that page:
``loss_fn(stats: TokenStats) -> (loss, aux)`` must return a 0-dim ``loss``; ``aux`` is returned as
computed by the final call, so put detached metrics there. The result can be run backward once
(``retain_graph`` and a second backward raise). ``tests/unit/test_fused_head_loss.py`` checks the
actor's losses against the unfused head in float64.

**Memory.** A chunk's logits and dz (``chunk_rows`` as for ``fused_head``), plus dH ``[T_masked, H]``
and dW (the shard's shape, fp32 for a half-precision weight) kept from forward to backward; both are
the gradients the caller receives anyway. Under a pipeline schedule the last stage runs each
micro-batch's backward right after its forward, so only one micro-batch's dW is alive at a time.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import torch
import torch.distributed as dist

from . import _ext, _fallback
from .fused_head import DEFAULT_CHUNK_BYTES, _checked, chunk_rows
from .token_stats import IGNORE_INDEX, TokenStats, _all_gather, merge

LossFn = Callable[[TokenStats], Tuple[torch.Tensor, Any]]


def _accumulate_dw(dw: torch.Tensor, dz: torch.Tensor, h_c: torch.Tensor, first: bool) -> None:
    """dW += dz^T h_c (dW = for the first chunk: no zero-filled buffer to read back); a half-precision
    product is summed in the fp32 buffer in vocabulary blocks no larger than the chunk's logits, so
    the temporary stays inside the chunk budget."""
    if dw.dtype == dz.dtype:
        if first:
            torch.mm(dz.t(), h_c, out=dw)
        else:
            dw.addmm_(dz.t(), h_c)
        return
    v, block = dz.shape[1], max(1, dz.shape[0] * dz.shape[1] // max(1, h_c.shape[1]))
    for v0 in range(0, v, block):
        prod = (dz[:, v0:v0 + block].t() @ h_c).to(dw.dtype)
        if first:
            dw[v0:v0 + block].copy_(prod)
        else:
            dw[v0:v0 + block] += prod


def _call(loss_fn: LossFn, stats: TokenStats):
    out = loss_fn(stats)
    if not (isinstance(out, tuple) and len(out) == 2 and torch.is_tensor(out[0]) and out[0].dim() == 0):
        got = type(out).__name__ if not isinstance(out, tuple) else f"a {len(out)}-tuple"
        if isinstance(out, tuple) and out and torch.is_tensor(out[0]):
            got += f" whose loss has shape {tuple(out[0].shape)}"
        raise ValueError(f"fused_head_loss: loss_fn must return (a 0-dim loss tensor, aux), got {got}")
    return out


def _token_grads(loss_fn: LossFn, full: Tuple[torch.Tensor, ...], rows: torch.Tensor) -> torch.Tensor:
    """[len(rows), 3] d loss / d (log-prob, entropy, self-certainty) at ``rows`` of the full vectors."""
    leaves = [t.detach().requires_grad_(True) for t in full]
    with torch.enable_grad():
        loss, _ = _call(loss_fn, TokenStats(*leaves))
        if not loss.requires_grad:  # the loss does not depend on the statistics
            return full[0].new_zeros(rows.numel(), 3)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    cols = [torch.zeros_like(full[0]) if g is None else g for g in grads]
    return torch.stack([c.index_select(0, rows) for c in cols], dim=1)


class _StoredGrads(torch.autograd.Function):
    """Attaches the forward's dH and dW to the loss: backward scales them by the loss's gradient, in
    place (a copy of dW would double the head's peak memory), so the graph can be run backward once."""

    @staticmethod
    def forward(ctx, hidden, weight, loss, dh, dw, group):
        ctx.grads, ctx.group = (dh, dw), group
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, g):
        if ctx.grads is None:
            raise RuntimeError("fused_head_loss: its gradients were formed once, in the forward, and were "
                               "already handed out; run the forward again instead of backward twice")
        (dh, dw), ctx.grads = ctx.grads, None
        dh.mul_(g.to(dh.dtype))
        if ctx.group is not None and dist.get_world_size(ctx.group) > 1:
            dist.all_reduce(dh, group=ctx.group)  # each shard saw only its part of the vocabulary
        dw = None if dw.numel() == 0 else dw.mul_(g.to(dw.dtype))
        return dh, dw, None, None, None, None


def _run_chunks(h, w, labels, loss_fn, full, row_of, args, need_dw):
    """The chunk loop (docs/fused_head.md). Fills ``full`` (the three [T] statistics) and returns (dH, dW)."""
    vocab_start, n_real, vocab_size, inv_t, rows, group, backend = args
    partials_op, grad_op = _ext.ops(backend)
    acc = _fallback.acc_dtype(h.dtype)
    wr = w[:n_real]
    half = w.dtype in (torch.bfloat16, torch.float16)
    dh = torch.empty_like(h)
    dw = None
    if need_dw:
        dw = torch.empty(w.shape, dtype=torch.float32 if half else w.dtype, device=w.device)
        dw[n_real:].zero_()  # padding rows: no vocabulary entry, no gradient
        if h.shape[0] == 0:
            dw.zero_()
    for lo in range(0, h.shape[0], rows):
        hi = min(h.shape[0], lo + rows)
        lab = labels[lo:hi]
        z = h[lo:hi] @ wr.t()
        parts = partials_op(z, lab, None, vocab_start, n_real, vocab_size, inv_t)
        (lp, ent, sc, _), stats = merge(_all_gather(parts, group), lab, vocab_size)
        where = row_of[lo:hi]
        for vec, val in zip(full, (lp, ent, sc)):
            vec.index_copy_(0, where, val.to(vec.dtype))
        g = _token_grads(loss_fn, full, where).to(acc)
        g[:, 0] = torch.where(lab == IGNORE_INDEX, torch.zeros((), dtype=acc, device=g.device), g[:, 0])
        grads = torch.cat([g, g.new_zeros(g.shape[0], 1)], dim=1)  # no KL column
        dz = grad_op(z, lab, None, stats.to(acc), grads, vocab_start, n_real, vocab_size, inv_t)
        del z
        torch.mm(dz, wr, out=dh[lo:hi])
        if dw is not None:
            _accumulate_dw(dw[:n_real], dz, h[lo:hi], first=lo == 0)
        del dz  # before the next chunk's logits: two [rows, V_local] tensors at a time, not three
    if dw is not None and half:
        dw = dw.to(w.dtype)
    return dh, dw


def fused_head_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, loss_fn: LossFn, *,
                    mask: Optional[torch.Tensor] = None, temperature: float = 1.0, vocab_start: int = 0,
                    vocab_size: Optional[int] = None, group=None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                    backend: Optional[str] = None) -> Tuple[torch.Tensor, TokenStats, Any]:
    """``loss_fn`` of the token statistics of ``hidden @ weight.T``, with the gradients formed in the
    forward (module doc). Arguments as for ``fused_head``. Returns ``(loss, stats, aux)``: ``loss``
    differentiable w.r.t. ``hidden`` and ``weight``; ``stats`` (detached, ``[T]`` each, 0 outside
    ``mask``) and ``aux`` from the final ``loss_fn`` call."""
    world = 1 if group is None else dist.get_world_size(group)
    vocab_size, n_real, labels = _checked(hidden, weight, labels, mask, None, None, temperature, vocab_start,
                                          vocab_size, group)
    total = hidden.shape[0]
    out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    full = tuple(torch.zeros(total, dtype=out_dtype, device=hidden.device) for _ in range(3))
    row_of = torch.arange(total, device=hidden.device)
    h = hidden
    if mask is not None:
        row_of = torch.nonzero(mask.bool(), as_tuple=False)[:, 0]
        h, labels = hidden.index_select(0, row_of), labels.index_select(0, row_of)
    # Every rank must cut the same chunks (one collective each), so the rows come from the vocabulary
    # share all ranks agree on, not from this rank's own (possibly uneven or padded) shard.
    share = -(-vocab_size // world)
    rows = min(max(1, h.shape[0]), chunk_rows(chunk_bytes, share, h.dtype))
    backend = _ext.choose(h.device, backend, h.dtype)
    args = (int(vocab_start), int(n_real), int(vocab_size), 1.0 / float(temperature), int(rows), group, backend)
    with torch.no_grad():
        dh, dw = _run_chunks(h.detach(), weight.detach(), labels, loss_fn, full, row_of, args,
                             need_dw=weight.requires_grad)
        loss, aux = _call(loss_fn, TokenStats(*full))
    if mask is not None:  # dH back onto all T rows; rows outside the mask get none
        dh = dh.new_zeros(hidden.shape).index_copy_(0, row_of, dh)
    empty = weight.new_zeros(0)
    out = _StoredGrads.apply(hidden, weight, loss.detach(), dh, empty if dw is None else dw, group)
    return out, TokenStats(*full), aux
