"""Megatron's local (no Transformer Engine) core attention, taught the packed THD layout.

Megatron's ``DotProductAttention`` refuses ``packed_seq_params`` (only TE's attention reads them). The
local spec is what CPU runs and tests use, so it must compute exactly what TE computes on a packed
stream: causal attention within each sequence of ``cu_seqlens`` and none across. Here the stream's
sequences are gathered into padded rows ``[L, n, heads, head_dim]`` (L the longest sequence) for
Megatron's masked attention, and the real tokens are gathered back: the padded layout's arithmetic for
attention (scores ``n x L x L`` per head, not ``T x T``: a dense stream-wide mask made packed slower than
padded on the CPU, benchmarks/results/train_packing_cpu.md), while every other layer runs on the
``T`` real tokens only. Rows are separate batch entries, so one row's tokens can never change
another's output by a single bit.

Rotary embeddings are applied before this module sees the tensors (``SelfAttention``), see
:meth:`.packing.Packing.seq_params` for why they stay per token.
"""
from __future__ import annotations

import copy
import functools
from typing import Optional

import torch

from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


def segments(cu_seqlens: torch.Tensor, total: int, device=None):
    """(starts, lengths) of the non-empty sequences of a stream of ``total`` tokens: those of
    ``cu_seqlens`` and, when tokens lie past ``cu_seqlens[-1]`` (padding), one more."""
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    if int(cu[-1]) < total:
        cu = torch.cat([cu, cu.new_tensor([total])])
    starts, lengths = cu[:-1], cu[1:] - cu[:-1]
    keep = lengths > 0
    return starts[keep], lengths[keep]


def row_layout(cu_seqlens: torch.Tensor, total: int, device=None, causal: bool = True):
    """The stream's sequences as padded rows: ``index [L, n]`` (stream position of row j's token i;
    a clamped copy past the row's end), ``valid [n, L]`` and the ``[n, 1, L, L]`` mask (True = masked:
    a padding key, and with ``causal`` a later one), L the longest sequence."""
    starts, lengths = segments(cu_seqlens, total, device)
    pos = torch.arange(int(lengths.max()) if lengths.numel() else 0, device=device)
    valid = pos[None, :] < lengths[:, None]
    index = (starts[:, None] + pos[None, :]).clamp(max=max(total - 1, 0)).t().contiguous()
    mask = ~valid[:, None, None, :]
    if causal:
        mask = (pos[None, :] > pos[:, None])[None, None] | mask
    else:
        mask = mask.expand(-1, -1, pos.numel(), -1)
    return index, valid, mask


@functools.lru_cache(maxsize=16)
def _cached_row_layout(cu: tuple, total: int, device, causal: bool):
    """``row_layout`` once per stream, not once per layer: every layer of a forward (and its backward)
    sees the same boundaries (the ViT alternates two: its windows and its images). The tensors are only
    read."""
    return row_layout(torch.tensor(cu, dtype=torch.long), total, device, causal)


class PackedDotProductAttention(DotProductAttention):
    """``DotProductAttention`` that also takes ``packed_seq_params`` (``qkv_format='thd'``): then
    query/key/value arrive as ``[T, heads, head_dim]`` (``SelfAttention`` squeezes the batch axis in
    that layout) and the result is ``[T, heads * head_dim]``, as from TE. Without them it is the
    parent, unchanged."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # A causal layer's softmax may take the fused upper-triangular kernel (fp16/bf16 on a GPU), which
        # ignores the mask it is given; the packed mask is not triangular, so the packed path uses a copy
        # whose mask type makes every path read the mask. Kept outside the module tree (plain object
        # attribute): it has no state, and the layer's parameter and module names stay Megatron's.
        softmax = copy.copy(self.scale_mask_softmax)
        softmax.attn_mask_type = AttnMaskType.padding
        self.__dict__["_masked_softmax"] = softmax

    def forward(self, query, key, value, attention_mask: Optional[torch.Tensor], attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias)
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"PackedDotProductAttention: qkv_format {packed_seq_params.qkv_format!r}, "
                             f"only 'thd' is packed")
        cu_q, cu_kv = packed_seq_params.cu_seqlens_q, packed_seq_params.cu_seqlens_kv
        if cu_kv is not None and cu_kv is not cu_q and not torch.equal(cu_q, cu_kv):
            raise ValueError("PackedDotProductAttention: self-attention needs cu_seqlens_q == cu_seqlens_kv")
        if packed_seq_params.cu_seqlens_q_padded is not None or packed_seq_params.cu_seqlens_kv_padded is not None:
            raise NotImplementedError("PackedDotProductAttention: padding between sequences "
                                      "(cu_seqlens_*_padded) is not supported; put padding at the end")
        if self.scale_mask_softmax.window_size is not None:
            raise NotImplementedError("PackedDotProductAttention: sliding-window attention is not packed")
        total = query.shape[0]
        # Each sequence attends as a padded row of its own (the padded layout's arithmetic): the score
        # work is sum over rows of L^2-ish, not T^2 for the whole stream, and a row never sees another.
        # The LM's layers are causal; the ViT's (an arbitrary-mask layer here) see their whole window or image.
        causal = self.attn_mask_type == AttnMaskType.causal
        index, valid, mask = _cached_row_layout(tuple(cu_q.tolist()), total, query.device, causal)
        causal_softmax = self.scale_mask_softmax
        self.scale_mask_softmax = self._masked_softmax
        try:
            out = super().forward(query[index], key[index], value[index], mask, AttnMaskType.padding,
                                  attention_bias)
        finally:
            self.scale_mask_softmax = causal_softmax
        return out.transpose(0, 1)[valid]  # [n, L, h*d] -> real tokens in stream order
