r"""Fused, vocab-parallel token statistics: log-prob, entropy, self-certainty (and full KL).

Definitions (docs/design.md section 1, eq. 1), per token, over the V *real* columns only
(columns at or past ``vocab_size`` are padding and ignored), with temperature T:

    x = z / T,   log Z = logsumexp_j x_j,   p = softmax(x)
    logprob  = x_y - log Z                       (0 for label -100, which also gets no gradient)
    entropy  = -sum_j p_j log p_j = log Z - mu,  mu = sum_j p_j x_j
    self_certainty = KL(U || p) = log Z - mean_j x_j - log V = log(S / V) - mean_j (x_j - M)
    kl       = KL(p || q) = sum_j p_j (x_j - r_j) - log Z + log Z_r,   q = softmax(r),  r = z_ref / T

Every statistic is taken in the scaled units x (the temperature applies to the reference too).

**Partials.** Each rank reduces its shard of a row to a few floats (the kernels in ``csrc/``,
or ``_fallback.py``), relative to its local maxima m = max x, m_r = max r:

    m, S = sum e_j, A = sum e_j (x_j - m), B = sum (x_j - m), y = x_label (if owned, else 0),
    n = number of real columns of the shard
    [with ref]  m_r, S_r = sum exp(r_j - m_r), C = sum e_j ((x_j - m) - (r_j - m_r))
    where e_j = exp(x_j - m); a term with e_j = 0 contributes 0 (so x_j = -inf is harmless).
    Layout: ``[T, 6]`` = (m, S, A, B, y, n), ``[T, 9]`` with (m_r, S_r, C) appended.

**Merge.** One all-gather of the partials; every rank then folds the ranks in the fixed order
0..W-1, so all ranks produce bitwise identical numbers. Moving a partial from its max m_k to the
global max M (delta = m_k - M, w = exp(delta)):

    S += w S_k,   A += w (A_k + delta S_k),   B += B_k + n_k delta,
    C += w (C_k + S_k (delta - delta_r)),   S_r += w_r S_r,k

and y simply adds (only the owner's y is non-zero, so the sum is exact). Then

    log Z = M + log S,  mu = M + A / S,  entropy = log S - A / S,
    self_certainty = log(S / V) - B / V,   kl = C / S - log S + log S_r,

written so that the large M cancels analytically (every statistic is M-free). B is kept relative
to the max for the same reason: as a plain sum of x_j it cancels against M in fp32 and a uniform
row at |x| ~ 1e4 came out at -3.6e-3; shifted, a uniform row sums exact zeros and S = V exactly,
so its self-certainty is exactly 0 at any offset.

**Backward** (no collective; per shard; one read of z [and z_ref], one write of dz). With the
incoming gradients c (logprob; 0 where the label is -100), g_H, g_SC, g_KL, and p_j = exp(x_j -
M - log S) from the saved (M, log S, hbar = A / S [, M_r, D = C / S]):

    d logprob / dx_j = 1[j = y] - p_j
    d entropy / dx_j = -p_j (x_j - mu)                 (d mu/dx_j = p_j (1 + x_j - mu))
    d sc      / dx_j = p_j - 1 / V
    d kl      / dx_j = p_j ((x_j - r_j) - sum_k p_k (x_k - r_k)) = p_j (d_j - D),
                       d_j = (x_j - M) - (r_j - M_r)  (the constants cancel against D)

and by the chain rule dz_j = dx_j / T on real columns, 0 on padding. In the code
``x_j - mu = (x_j - M) - hbar``. The reference logits are constant (no gradient). Saved for
backward: 3 floats per token (5 with ``ref_logits``) plus references to the inputs, never a copy.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist

from . import _ext
from ._fallback import acc_dtype

IGNORE_INDEX = -100


class _TokenStatsFields(NamedTuple):
    logprob: torch.Tensor
    entropy: torch.Tensor
    self_certainty: torch.Tensor


class TokenStats(_TokenStatsFields):
    """``(logprob, entropy, self_certainty)``, each ``[T]``; plus the attribute ``kl``.

    A 3-field named tuple, so ``lp, h, sc = token_stats(...)`` keeps working; ``out.kl`` is the
    per-token full-vocabulary KL(pi || pi_ref) when ``ref_logits`` was given, else None.
    """

    def __new__(cls, logprob, entropy, self_certainty, kl=None):
        self = super().__new__(cls, logprob, entropy, self_certainty)
        self.kl = kl
        return self

    def __getnewargs__(self):
        return (self.logprob, self.entropy, self.self_certainty, self.kl)


def _all_gather(parts: torch.Tensor, group) -> torch.Tensor:
    """``[W, T, K]``: the partials of every rank, in rank order (the one collective)."""
    world = 1 if group is None else dist.get_world_size(group)
    if world == 1:
        return parts[None]
    parts = parts.contiguous()
    if dist.get_backend(group) == "gloo":  # gloo lacks all_gather_into_tensor in some builds
        out = [torch.empty_like(parts) for _ in range(world)]
        dist.all_gather(out, parts, group=group)
        return torch.stack(out)
    out = parts.new_empty((world,) + tuple(parts.shape))
    dist.all_gather_into_tensor(out, parts, group=group)
    return out


def shard_sizes(n_local: int, vocab_start: int, vocab_size: Optional[int], group) -> Tuple[int, int]:
    """``(vocab_size, n_real)``: the global number of real tokens (default ``vocab_start + n_local``
    unsharded, ``n_local * world`` with a group) and how many of the shard's columns are real."""
    world = 1 if group is None else dist.get_world_size(group)
    if vocab_size is None:
        vocab_size = vocab_start + n_local if world == 1 else n_local * world
    return vocab_size, max(0, min(n_local, vocab_size - vocab_start))


def autograd_outputs(lp, h, sc, kl, like: torch.Tensor):
    """The four outputs of the autograd functions: float32 (float64 for float64 inputs), and an
    empty ``kl`` without a reference (an autograd function cannot return None among tensors)."""
    dt = acc_dtype(like.dtype)
    return lp.to(dt), h.to(dt), sc.to(dt), kl.to(dt) if kl is not None else like.new_zeros(0, dtype=dt)


def grad_columns(labels, g_lp, g_h, g_sc, g_kl, has_ref: bool, acc: torch.dtype) -> torch.Tensor:
    """``[T, 4]`` incoming gradients (logprob, entropy, self-certainty, kl) as the kernels read them:
    zeros for an output that got none, and no logprob gradient at an ignored label."""
    def col(g):
        return torch.zeros(labels.shape[0], dtype=acc, device=labels.device) if g is None else g.to(acc)

    c = torch.where(labels == IGNORE_INDEX, torch.zeros((), dtype=acc, device=labels.device), col(g_lp))
    g_kl = None if not has_ref or g_kl is None or g_kl.numel() == 0 else g_kl
    return torch.stack([c, col(g_h), col(g_sc), col(g_kl)], dim=1)


def merge(gathered: torch.Tensor, labels: torch.Tensor, vocab_size: int):
    """Fold ``[W, T, K]`` partials in rank order; return (outputs, saved stats), see module doc."""
    g = gathered.to(torch.float64)  # [T]-sized work: float64 costs nothing here
    if g.shape[-1] not in (6, 9):
        raise ValueError(f"token_stats merge: partials must have 6 or 9 columns, got {g.shape[-1]}")
    m, s, a, b, y, n = (g[..., i] for i in range(6))
    big_m = m.amax(0)
    big_m = torch.where(torch.isfinite(big_m), big_m, torch.zeros_like(big_m))
    has_ref = g.shape[-1] == 9
    if has_ref:
        mr_all = g[..., 6].amax(0)
        big_mr = torch.where(torch.isfinite(mr_all), mr_all, torch.zeros_like(mr_all))
    zero = torch.zeros((), dtype=torch.float64, device=g.device)
    s_t = a_t = b_t = y_t = sr_t = c_t = zero
    for k in range(g.shape[0]):  # fixed order: every rank does the same float operations
        live = s[k] > 0  # a shard with no real column (or all -inf) contributes only to B
        delta = torch.where(live, m[k] - big_m, zero)
        w = torch.where(live, torch.exp(delta), zero)
        s_t = s_t + w * s[k]
        a_t = a_t + torch.where(live, w * (a[k] + delta * s[k]), zero)
        # A shard whose max is -inf holds only -inf (B_k = -inf already) or nothing (B_k = 0).
        b_t = b_t + torch.where(m[k] > -math.inf, b[k] + n[k] * (m[k] - big_m), b[k])
        y_t = y_t + y[k]
        if has_ref:
            live_r = g[k, :, 7] > 0
            delta_r = torch.where(live_r, g[k, :, 6] - big_mr, zero)
            sr_t = sr_t + torch.where(live_r, torch.exp(delta_r) * g[k, :, 7], zero)
            c_t = c_t + torch.where(live, w * (g[k, :, 8] + s[k] * (delta - delta_r)), zero)
    log_s = torch.log(s_t)
    hbar = a_t / s_t
    ignore = labels == IGNORE_INDEX
    logprob = torch.where(ignore, zero, y_t - big_m - log_s)
    entropy = log_s - hbar
    sc = torch.log(s_t / vocab_size) - b_t / vocab_size
    cols = [big_m, log_s, hbar]
    kl = None
    if has_ref:
        d = c_t / s_t
        kl = d - log_s + torch.log(sr_t)
        cols += [big_mr, d]
    return (logprob, entropy, sc, kl), torch.stack(cols, dim=1)


class _TokenStatsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ref, vocab_start, n_real, vocab_size, inv_t, group, backend):
        partials_op, grad_op = _ext.ops(backend)
        parts = partials_op(logits, labels, ref, vocab_start, n_real, vocab_size, inv_t)
        outs, stats = merge(_all_gather(parts, group), labels, vocab_size)
        ctx.save_for_backward(logits, labels, ref, stats.to(acc_dtype(logits.dtype)))
        ctx.args = (vocab_start, n_real, vocab_size, inv_t, grad_op)
        ctx.mark_non_differentiable(labels)
        return autograd_outputs(*outs, like=logits)

    @staticmethod
    def backward(ctx, g_lp, g_h, g_sc, g_kl):
        logits, labels, ref, stats = ctx.saved_tensors
        vocab_start, n_real, vocab_size, inv_t, grad_op = ctx.args
        grads = grad_columns(labels, g_lp, g_h, g_sc, g_kl, ref is not None, stats.dtype)
        dz = grad_op(logits, labels, ref, stats, grads, vocab_start, n_real, vocab_size, inv_t)
        return dz, None, None, None, None, None, None, None, None


def _check(logits, labels, ref, vocab_start, vocab_size, temperature):
    if logits.dim() != 2:
        raise ValueError(f"token_stats: logits must be [T, V_local], got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"token_stats: labels must be [T]={logits.shape[0]}, got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"token_stats: labels must be int64/int32, got {labels.dtype}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(f"token_stats: logits dtype {logits.dtype} not supported")
    if ref is not None and (ref.shape != logits.shape or ref.dtype != logits.dtype):
        raise ValueError(f"token_stats: ref_logits must match logits ({tuple(logits.shape)}, "
                         f"{logits.dtype}), got ({tuple(ref.shape)}, {ref.dtype})")
    check_range("token_stats", labels, temperature, vocab_start, vocab_size)


def check_range(who: str, labels, temperature, vocab_start, vocab_size, mask=None) -> None:
    """The checks ``token_stats`` and ``fused_head`` share: temperature, vocabulary, label range."""
    if not temperature > 0:
        raise ValueError(f"{who}: temperature must be > 0, got {temperature}")
    if vocab_size <= 0 or vocab_start < 0:
        raise ValueError(f"{who}: need vocab_size > 0 and vocab_start >= 0, got {vocab_size}, {vocab_start}")
    # Label range check on CPU only: on a GPU it would cost a host sync per call.
    if labels.device.type == "cpu" and labels.numel() and not torch.compiler.is_compiling():
        bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab_size))
        if mask is not None:  # rows outside the mask are never computed
            bad &= mask.bool()
        if bool(bad.any()):
            row = int(torch.nonzero(bad)[0, 0])
            raise ValueError(f"{who}: label {int(labels[row])} at row {row} is outside "
                             f"[0, vocab_size={vocab_size}) and is not {IGNORE_INDEX}")


def token_stats(logits: torch.Tensor, labels: torch.Tensor, *, vocab_start: int = 0,
                vocab_size: Optional[int] = None, group=None, temperature: float = 1.0,
                ref_logits: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> TokenStats:
    """Per-token log-prob, entropy and self-certainty of a vocab-parallel logits shard.

    Contract: docs/design.md section 3.1. Beyond it: ``logits`` may be fp64 (gradcheck), ``group``
    None means unsharded, ``vocab_size`` defaults to ``vocab_start + V_local`` unsharded and
    ``V_local * world`` with a group, and ``backend`` is ``auto`` | ``ext`` | ``torch`` (see
    ``_ext.choose``). The formulas and their derivatives are in this module's docstring.
    """
    vocab_size, n_real = shard_sizes(logits.shape[-1], vocab_start, vocab_size, group)
    _check(logits, labels, ref_logits, vocab_start, vocab_size, temperature)
    labels = labels.long()
    chosen = _ext.choose(logits.device, backend, logits.dtype)
    if ref_logits is not None:
        ref_logits = ref_logits.detach()
    lp, h, sc, kl = _TokenStatsFn.apply(logits, labels, ref_logits, int(vocab_start), int(n_real),
                                        int(vocab_size), 1.0 / float(temperature), group, chosen)
    return TokenStats(lp, h, sc, kl if ref_logits is not None else None)
