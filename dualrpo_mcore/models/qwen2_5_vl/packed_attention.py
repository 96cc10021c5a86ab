"""Megatron's local (no Transformer Engine) core attention, taught the packed THD layout.

Megatron's ``DotProductAttention`` refuses ``packed_seq_params`` (only TE's attention reads them), and the
CPU runs and tests use the local spec, so it must compute exactly what TE computes on a packed stream:
the layout, the length buckets and the ViT's use of them are in docs/design.md §5. Why buckets: a dense
stream-wide mask made packed 2.4x slower than padded, and one padded row per sequence (``n L_max^2``)
only tied padded on the demo's lengths (benchmarks/results/train_packing_cpu.md).

SDPA computes what Megatron's masked softmax does when attention dropout is off, the softmax is the
vanilla one and no query-key layer scaling or sliding window is configured (the Qwen2.5-VL configs);
:meth:`PackedDotProductAttention.sdpa_applies` says so, and the padded (non-packed) layout takes the
same kernel then, so packed and padded compare like with like. Otherwise the padded layout is Megatron's
own path, and a packed stream is refused.

Rotary embeddings are applied before this module sees the tensors (``SelfAttention``), see
:meth:`.packing.Packing.seq_params` for why they stay per token.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

# Megatron's attention_mask_func fills masked scores with this; an additive mask of it gives the same
# softmax for every query with one visible key, and stays finite for a query with none (an empty row).
_MASKED_SCORE = -10000.0


def segments(cu_seqlens: torch.Tensor, total: int, device=None):
    """(starts, lengths) of the non-empty sequences of a stream of ``total`` tokens: those of
    ``cu_seqlens`` and, when tokens lie past ``cu_seqlens[-1]`` (padding), one more."""
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    if int(cu[-1]) < total:
        cu = torch.cat([cu, cu.new_tensor([total])])
    starts, lengths = cu[:-1], cu[1:] - cu[:-1]
    keep = lengths > 0
    return starts[keep], lengths[keep]


def length_ceiling(n: int) -> int:
    """The bucket of a sequence of ``n`` tokens: the smallest ``k`` with ``n <= 2 ** (k / 4)`` (quarter-octave
    ceilings), in integers: ``n ** 4 <= 2 ** k``."""
    return max(int(n) ** 4 - 1, 0).bit_length()


def length_buckets(lengths: Sequence[int]) -> List[List[int]]:
    """Indices of the sequences in each bucket: those with one :func:`length_ceiling`, shortest bucket first.
    Padding a bucket to its longest costs under 2 ** (1/4) = 1.19x its rows' tokens and 1.41x their ``L^2``
    score work, at one kernel call per bucket (four per doubling of the length). Power-of-two ceilings (up to
    2x and 4x) left 13.7% more LM FLOPs executed than useful on the demo's lengths, these 2.0%
    (benchmarks/results/train_packing_cpu.md)."""
    groups: dict = {}
    for i, n in enumerate(lengths):
        groups.setdefault(length_ceiling(n), []).append(i)
    return [groups[k] for k in sorted(groups)]


class RowLayout:
    """Where the buckets' padded rows read the stream and where the stream reads them back.

    ``buckets``: per bucket ``(index [n_b, L_b], valid [n_b, L_b], mask)``: the stream position each place
    reads (a clamped copy past a row's end), which places are real, and the key mask of rows that have
    padding (``[n_b, 1, 1, L_b]``, True = attend; None when every row is full, or causal: a real query never
    sees a later key). ``take``: every bucket's ``index`` flattened, bucket after bucket (the places, in the
    order the rows are laid out); ``slot``: for each stream position, its one real place in ``take``.
    ``rows``: ``(n, L)`` when the stream is ``n`` back-to-back sequences of ``L`` tokens (the ViT's windows and
    images of one size), whose rows are then a view of the stream, else None."""

    def __init__(self, cu_seqlens: torch.Tensor, total: int, device=None, causal: bool = True):
        starts, lengths = segments(cu_seqlens, total, device)
        self.buckets: List[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]] = []
        places = []
        for rows in length_buckets(lengths.tolist()):
            sel = torch.tensor(rows, dtype=torch.long, device=device)
            n, longest = lengths[sel], int(lengths[sel].max())
            pos = torch.arange(longest, device=device)
            valid = pos[None, :] < n[:, None]
            index = (starts[sel, None] + pos[None, :]).clamp(max=max(total - 1, 0))
            mask = None if causal or bool(valid.all()) else valid[:, None, None, :]
            self.buckets.append((index, valid, mask))
            places.append((index.reshape(-1), valid.reshape(-1)))
        self.take = torch.cat([i for i, _ in places]) if places else torch.empty(0, dtype=torch.long, device=device)
        self.slot = torch.empty(total, dtype=torch.long, device=device)
        if places:
            real = torch.cat([v for _, v in places])
            self.slot[self.take[real]] = torch.nonzero(real).squeeze(1)
        index, valid, _ = self.buckets[0] if len(self.buckets) == 1 else (None, None, None)
        whole = index is not None and bool(valid.all()) and torch.equal(self.take, torch.arange(total, device=device))
        self.rows = tuple(index.shape) if whole else None


class _ToRows(torch.autograd.Function):
    """``x[layout.take]``: the stream's tokens at their bucket places. The backward reads each token's
    gradient at its one real place (``layout.slot``), a gather, where autograd's indexing would scatter-add
    over every place: the places past a row's end get exactly zero gradient (no real query attends to those
    keys, and their queries' outputs are dropped), so the sum is the real place's value, bitwise."""

    @staticmethod
    def forward(ctx, x, take, slot):
        ctx.save_for_backward(slot)
        return x.index_select(0, take)

    @staticmethod
    def backward(ctx, grad):
        (slot,) = ctx.saved_tensors
        return grad.index_select(0, slot), None, None


class _ToStream(torch.autograd.Function):
    """``rows[layout.slot]``: each stream token's output from its real place; the backward puts the gradient
    at those places and zero elsewhere (no accumulation: each place is read at most once)."""

    @staticmethod
    def forward(ctx, rows, slot):
        ctx.save_for_backward(slot)
        ctx.places = rows.shape[0]
        return rows.index_select(0, slot)

    @staticmethod
    def backward(ctx, grad):
        (slot,) = ctx.saved_tensors
        return grad.new_zeros((ctx.places,) + grad.shape[1:]).index_copy_(0, slot, grad), None


@functools.lru_cache(maxsize=16)
def _cached_layout(cu: tuple, total: int, device, causal: bool) -> RowLayout:
    """One layout per stream, not one per layer: every layer of a forward (and its backward) sees the same
    boundaries (the ViT alternates two: its windows and its images). The tensors are only read."""
    return RowLayout(torch.tensor(cu, dtype=torch.long), total, device, causal)


_last_bias: list = [None, None]  # (mask, its additive form): the layers of a forward share one mask


def _additive(mask: torch.Tensor, dtype) -> torch.Tensor:
    """Megatron's boolean mask (True = masked) as SDPA's additive one, built once per mask tensor (every
    layer of a forward gets the same one) rather than once per layer."""
    held, bias = _last_bias
    if held is not mask or bias.dtype != dtype:
        bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, _MASKED_SCORE)
        _last_bias[:] = [mask, bias]
    return bias


def attend(query, key, value, layout: RowLayout, causal: bool, scale: Optional[float]) -> torch.Tensor:
    """Attention within each sequence of ``layout`` for ``[T, heads, head_dim]`` query/key/value (as many
    key/value heads as query heads); returns ``[T, heads, head_dim]``."""
    if layout.rows is not None:  # no gathers: the stream is already the rows (2-3% of a tiny step's ViT)
        q, k, v = (x.reshape(*layout.rows, *x.shape[1:]).transpose(1, 2) for x in (query, key, value))
        # Every row is full (``RowLayout.rows``), so no key is padding: no mask.
        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
        return o.transpose(1, 2).reshape(query.shape)
    places = [index.numel() for index, _, _ in layout.buckets]
    qkv = [_ToRows.apply(x, layout.take, layout.slot).split(places) for x in (query, key, value)]
    outs = []
    for (index, _, mask), q, k, v in zip(layout.buckets, *qkv):
        q, k, v = (x.view(*index.shape, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))  # [n_b, h, L_b, d]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
        outs.append(o.transpose(1, 2).reshape(-1, o.shape[1], o.shape[3]))  # [n_b * L_b, h, d]
    return _ToStream.apply(torch.cat(outs) if len(outs) > 1 else outs[0], layout.slot)  # one bucket: no copy


class PackedDotProductAttention(DotProductAttention):
    """``DotProductAttention`` that also takes ``packed_seq_params`` (``qkv_format='thd'``): then
    query/key/value arrive as ``[T, heads, head_dim]`` (``SelfAttention`` squeezes the batch axis in
    that layout) and the result is ``[T, heads * head_dim]``, as from TE. The padded layout
    (``[S, B, heads, head_dim]`` and a boolean mask, True = masked) returns ``[S, B, heads * head_dim]``."""

    def sdpa_applies(self) -> bool:
        """Whether SDPA computes exactly this layer's attention (see the module docstring)."""
        c = self.config
        dropout = self.attention_dropout.p if self.training else 0.0
        return (dropout == 0.0 and not c.apply_query_key_layer_scaling and self.softmax_offset is None
                and self.scale_mask_softmax.window_size is None)

    def _heads(self, key, value, dim: int):
        """Grouped-query attention: each key/value head repeated for its query heads (as Megatron does)."""
        rep = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if rep > 1:
            key, value = key.repeat_interleave(rep, dim=dim), value.repeat_interleave(rep, dim=dim)
        return key, value

    def forward(self, query, key, value, attention_mask: Optional[torch.Tensor], attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is None:
            if not self.sdpa_applies() or attention_bias is not None:
                return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias)
            return self._padded(query, key, value, attention_mask)
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"PackedDotProductAttention: qkv_format {packed_seq_params.qkv_format!r}, "
                             f"only 'thd' is packed")
        cu_q, cu_kv = packed_seq_params.cu_seqlens_q, packed_seq_params.cu_seqlens_kv
        if cu_kv is not None and cu_kv is not cu_q and not torch.equal(cu_q, cu_kv):
            raise ValueError("PackedDotProductAttention: self-attention needs cu_seqlens_q == cu_seqlens_kv")
        if packed_seq_params.cu_seqlens_q_padded is not None or packed_seq_params.cu_seqlens_kv_padded is not None:
            raise NotImplementedError("PackedDotProductAttention: padding between sequences "
                                      "(cu_seqlens_*_padded) is not supported; put padding at the end")
        if not self.sdpa_applies() or attention_bias is not None:
            raise NotImplementedError("PackedDotProductAttention: packed attention needs attention dropout 0, the "
                                      "vanilla softmax, no query-key layer scaling, no sliding window and no bias")
        # The LM's layers are causal; the ViT's (an arbitrary-mask layer here) see their whole window or image.
        causal = self.attn_mask_type == AttnMaskType.causal
        layout = _cached_layout(tuple(cu_q.tolist()), query.shape[0], query.device, causal)
        key, value = self._heads(key, value, dim=1)
        out = attend(query, key, value, layout, causal, self.softmax_scale)
        return out.reshape(out.shape[0], -1)

    def _padded(self, query, key, value, attention_mask):
        """The padded layout through SDPA: Megatron's mask (True = masked) as an additive one."""
        key, value = self._heads(key, value, dim=2)
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [S, B, h, d] -> [B, h, S, d]
        bias = None if attention_mask is None else _additive(attention_mask, q.dtype)
        causal = bias is None and self.attn_mask_type == AttnMaskType.causal
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=causal, scale=self.softmax_scale)
        return o.permute(2, 0, 1, 3).reshape(o.shape[2], o.shape[0], -1)
