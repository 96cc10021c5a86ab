"""Megatron's local (no Transformer Engine) core attention, taught the packed THD layout.

Megatron's ``DotProductAttention`` refuses ``packed_seq_params`` (only TE's attention reads them). The
local spec is what CPU runs and tests use, so it must compute exactly what TE computes on a packed
stream: causal attention within each sequence of ``cu_seqlens`` and none across. Here that is the
ordinary masked attention over the whole stream with a block-diagonal causal mask: the same arithmetic
as a padded batch's rows, the other rows' keys getting probability exactly 0 (so one row's tokens can
never change another's output by a single bit). Memory is ``T x T`` per head, like the padded path's
``S x S`` per row and head: fine for the CPU sizes this spec serves.

Rotary embeddings are applied before this module sees the tensors (``SelfAttention``), see
:meth:`.packing.Packing.seq_params` for why they stay per token.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch

from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


def packed_causal_mask(cu_seqlens: torch.Tensor, total: int, device=None) -> torch.Tensor:
    """[1, 1, T, T] boolean mask, True = masked (Megatron's convention): causal within each sequence
    ``[cu_seqlens[i], cu_seqlens[i + 1])``, nothing across. Tokens past ``cu_seqlens[-1]`` form one
    more sequence."""
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    tokens = torch.arange(total, device=device)
    segment = torch.searchsorted(cu[1:].contiguous(), tokens, right=True)
    causal = tokens[None, :] > tokens[:, None]
    return (causal | (segment[:, None] != segment[None, :]))[None, None]


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
        mask = packed_causal_mask(cu_q, total, query.device)
        causal_softmax = self.scale_mask_softmax
        self.scale_mask_softmax = self._masked_softmax
        try:
            out = super().forward(query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1), mask,
                                  AttnMaskType.padding, attention_bias)
        finally:
            self.scale_mask_softmax = causal_softmax
        return out.reshape(total, -1)
