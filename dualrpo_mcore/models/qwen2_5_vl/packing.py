"""Padding-free micro-batches: the rows of a batch concatenated into one token stream (the layout, its
attention and its rotary: docs/design.md §5).

:func:`pack` builds the stream from a padded batch; :meth:`Packing.unpack` puts per-token outputs back at
their ``[B, S]`` places. :class:`~.model.QwenVLModel` takes the stream with ``packed=Packing``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from . import geometry


@dataclass(frozen=True, eq=False)
class Packing:
    """Where the rows of a packed stream lie, and (when built by :func:`pack`) where they came from."""

    cu_seqlens: torch.Tensor
    """int32 [rows + 1]: row boundaries in the stream, from 0 to the number of real tokens."""
    total: int
    """T, the stream's length: the real tokens plus trailing padding."""
    index: Optional[torch.Tensor] = None
    """long [cu_seqlens[-1]]: each real token's flat position ``b * S + s`` in the padded batch."""
    padded_shape: Optional[Tuple[int, int]] = None
    """(B, S) of the padded batch it was packed from."""

    def __post_init__(self):
        cu = self.cu_seqlens
        if cu.dim() != 1 or cu.numel() < 2 or int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"cu_seqlens must rise from 0 over rows + 1 entries, got {cu.tolist()}")
        if int(cu[-1]) > self.total:
            raise ValueError(f"cu_seqlens ends at {int(cu[-1])}, past the stream's {self.total} tokens")

    @property
    def rows(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def tokens(self) -> int:
        """Real (unpadded) tokens in the stream."""
        return int(self.cu_seqlens[-1])

    def seq_params(self):
        """Megatron's :class:`PackedSeqParams` in the THD layout for this stream.

        The trailing padding is a sequence of its own, so the boundaries cover all ``T`` tokens: attention
        sees no token outside a sequence, and Megatron's THD rotary keeps each token's own mrope entry only
        then (``rope_utils._apply_rotary_pos_emb_thd``, "CASE 1", megatron-core 0.16 and 0.19; docs/design.md
        §5 "Rotary")."""
        cu = self.cu_seqlens.to(torch.int32)
        if self.total > self.tokens:
            cu = torch.cat([cu, cu.new_tensor([self.total])])
        return thd_params(cu)

    def unpack(self, x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """Per-token values ``[1, T, ...]`` or ``[T, ...]`` of the stream -> ``[B, S, ...]`` of the padded
        batch (``fill`` on its padding). Differentiable."""
        if self.index is None or self.padded_shape is None:
            raise ValueError("unpack: this Packing was not built by pack() from a padded batch")
        x = x[0] if x.dim() >= 2 and x.shape[0] == 1 and x.shape[1] == self.total else x
        if x.shape[0] != self.total:
            raise ValueError(f"unpack: expected {self.total} tokens, got shape {tuple(x.shape)}")
        b, s = self.padded_shape
        out = x.new_full((b * s, *x.shape[1:]), fill)
        out = out.index_copy(0, self.index.to(x.device), x[: self.tokens])
        return out.view(b, s, *x.shape[1:])


def thd_params(cu_seqlens: torch.Tensor):
    """Megatron's :class:`PackedSeqParams` (THD layout, self-attention) for sequences that lie back to back
    at the boundaries ``cu_seqlens`` (int32, from 0 to the stream's length)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    longest = max(lengths) if lengths else 0
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def segments_params(lengths, device=None):
    """:func:`thd_params` for consecutive segments of the given lengths (the ViT's windows or images)."""
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(list(lengths), dtype=torch.int32).cumsum(0)
    return thd_params(cu.to(device) if device is not None else cu)


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_grid_thw: Optional[torch.Tensor],
         image_token_id: int, spatial_merge_size: int, multiple: int = 1, pad_id: int = 0
         ) -> Tuple[torch.Tensor, torch.Tensor, Packing]:
    """A padded batch ``[B, S]`` (``attention_mask`` 1 = real token) -> ``(input_ids [1, T],
    position_ids [3, 1, T], packing)``: each row's real tokens in order, rows one after another, and the
    stream padded with ``pad_id`` to a multiple of ``multiple`` tokens (at least one token). Rows without
    a real token stay in as empty rows, so row r of the pack is row r of the batch."""
    b, s = input_ids.shape
    real = attention_mask.bool().reshape(-1)
    index = real.nonzero(as_tuple=True)[0]
    lengths = attention_mask.bool().sum(dim=1)
    cu = torch.zeros(b + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0).to(torch.int32).cpu()
    n = int(cu[-1])
    total = max(n + (-n % multiple), multiple)
    ids = input_ids.new_full((1, total), pad_id)
    ids[0, :n] = input_ids.reshape(-1)[index]
    packing = Packing(cu_seqlens=cu.to(input_ids.device), total=total, index=index, padded_shape=(b, s))
    pos = geometry.packed_rope_index(ids, packing.cu_seqlens, image_grid_thw, image_token_id, spatial_merge_size)
    return ids, pos, packing


def _table_rotary(original):
    """megatron-core's unfused rotation (``rope_utils._apply_rotary_pos_emb_bshd``, 0.16 and 0.19), less its
    repeated work: it computes cos and sin of the table for q and for k in every layer, and copies its output
    through a ``cat`` with an empty pass-through part when the rotary covers the whole head. Here cos and sin
    are computed once per table (every layer of a forward passes the same one) and the copy is skipped: the
    same expressions on the same values, so the result is bitwise Megatron's. Multi-latent attention's
    interleave, and any call this does not know, go to Megatron's own code."""
    from megatron.core.models.common.embeddings.rope_utils import _rotate_half

    tables = [None, None, None]  # (freqs, (mscale, dtype), (cos, sin))

    def rotate(t, freqs, *args, rotary_interleaved=False, mscale=1.0, **kwargs):
        if args or any(kwargs.values()) or not {"multi_latent_attention", "mla_rotary_interleaved"}.issuperset(kwargs):
            return original(t, freqs, *args, rotary_interleaved=rotary_interleaved, mscale=mscale, **kwargs)
        if tables[0] is not freqs or tables[1] != (mscale, t.dtype):
            tables[:] = [freqs, (mscale, t.dtype),
                         ((torch.cos(freqs) * mscale).to(t.dtype), (torch.sin(freqs) * mscale).to(t.dtype))]
        (cos_, sin_), rot = tables[2], freqs.shape[-1]
        x = t[..., :rot]
        out = (x * cos_) + (_rotate_half(x, rotary_interleaved) * sin_)
        return out if rot == t.shape[-1] else torch.cat((out, t[..., rot:]), dim=-1)

    rotate.megatron_original = original
    return rotate


def _stream_rotary(original):
    """megatron-core's unfused THD rotary (``rope_utils._apply_rotary_pos_emb_thd``, 0.16 and 0.19), less its
    per-sequence loop where the loop changes nothing.

    With one context-parallel rank and a per-token table (``freqs`` has one entry per token, the boundaries
    end at its length: Megatron's "CASE 1", the packed mrope and the segmented ViT), Megatron slices each
    sequence's entries at its own offset and concatenates them: the table itself, rebuilt through one
    ``.item()`` per sequence (a device sync each, per layer, on GPU) and a Python loop. The rotation is then one
    call over the stream (:func:`_table_rotary`), which this makes directly: same ops on the same values, so
    the result is bitwise Megatron's. Anything else (context parallelism, a max-length table, boundaries short
    of the stream) goes to Megatron's own code."""
    import inspect

    from megatron.core.models.common.embeddings import rope_utils

    bshd = getattr(rope_utils._apply_rotary_pos_emb_bshd, "megatron_original", rope_utils._apply_rotary_pos_emb_bshd)
    takes = set(inspect.signature(bshd).parameters)  # the options Megatron's THD passes on (0.16 and 0.19 differ)
    rotate = _table_rotary(bshd)
    last = [None, None]  # (cu_seqlens, its end): every layer of a forward passes the same tensor

    def stream_end(cu_seqlens) -> int:
        # One read of the end per forward, not per layer: each read is a device sync on GPU.
        if last[0] is not cu_seqlens:
            last[:] = [cu_seqlens, int(cu_seqlens[-1])]
        return last[1]

    def apply(t, cu_seqlens, freqs, *args, cp_group=None, **kwargs):
        if (args or not takes.issuperset(kwargs) or cp_group is None or cp_group.size() != 1
                or freqs.dim() < 1 or freqs.size(0) != t.size(0) or stream_end(cu_seqlens) != t.size(0)):
            return original(t, cu_seqlens, freqs, *args, cp_group=cp_group, **kwargs)
        return rotate(t.unsqueeze(1), freqs, **kwargs).squeeze(1)

    apply.megatron_original = original
    return apply


def install_stream_rotary() -> None:
    """Routes Megatron's unfused rotary through :func:`_stream_rotary` (THD) and :func:`_table_rotary` (the
    padded layout), idempotent; the module-level names are what ``rope_utils.apply_rotary_pos_emb`` calls."""
    from megatron.core.models.common.embeddings import rope_utils

    if not hasattr(rope_utils._apply_rotary_pos_emb_thd, "megatron_original"):
        rope_utils._apply_rotary_pos_emb_thd = _stream_rotary(rope_utils._apply_rotary_pos_emb_thd)
    if not hasattr(rope_utils._apply_rotary_pos_emb_bshd, "megatron_original"):
        rope_utils._apply_rotary_pos_emb_bshd = _table_rotary(rope_utils._apply_rotary_pos_emb_bshd)
