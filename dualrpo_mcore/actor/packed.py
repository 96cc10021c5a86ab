"""The actor's micro-batches as packed token streams (``actor.model.packing``): docs/design.md
section 5, "Layout" and "In the actor" (which positions are targets, why labels never cross a row
boundary, and how statistics go back to ``[b, s]``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict

import torch

from dualrpo_mcore.models.qwen2_5_vl.packing import Packing, pack

KEY = "packed"
"""Where a packed micro-batch keeps its :class:`PackedMicro` (the ``[b, s]`` fields stay as they are:
losses read them)."""


@dataclass(frozen=True, eq=False)
class PackedMicro:
    """The model inputs of one packed micro-batch and its prediction targets in stream order."""

    input_ids: torch.Tensor
    """long [1, T]: the rows' real tokens, then padding to the layout's multiple."""
    position_ids: torch.Tensor
    """long [3, 1, T]: each row's own mrope positions."""
    packing: Packing
    """Row boundaries, and the map back to the micro-batch's [b, s]."""
    labels: torch.Tensor
    """long [T - 1]: the token each position predicts (``input_ids[0, 1:]``)."""
    keep: torch.Tensor
    """bool [T - 1]: position p predicts a response token of its own row."""

    @property
    def total(self) -> int:
        return self.packing.total

    def to_rows(self, stat: torch.Tensor) -> torch.Tensor:
        """A statistic of the ``T - 1`` predicting positions -> ``[b, s]`` at the predicted tokens' places
        (padding gets 0). Differentiable. Column 0 of a row receives the previous row's last position,
        which predicts nothing: callers multiply by the response mask, which is 0 there."""
        return self.packing.unpack(torch.cat([stat.new_zeros(1), stat]))


def pack_micro(mb: Dict[str, Any], image_token_id: int, merge: int, multiple: int) -> PackedMicro:
    """``mb``'s rows as one stream padded to a multiple of ``multiple`` tokens (at least one token)."""
    ids, mask = mb["input_ids"], mb["attention_mask"].bool()
    lengths = mask.sum(1)
    prefix = torch.arange(ids.shape[1], device=ids.device)[None] < lengths[:, None]
    if not torch.equal(mask, prefix):
        row = int((mask != prefix).any(1).nonzero()[0, 0])
        # A hole would make the padded layout's "column j - 1 predicts j" and the stream's "p predicts
        # p + 1" disagree: refuse rather than silently change which token predicts which.
        raise ValueError(f"packed micro-batch row {row}: attention_mask is not right-padded (1s then 0s); "
                         f"set actor.model.packing=false for such batches")
    stream, positions, packing = pack(ids, mask.long(), mb.get("image_grid_thw"), image_token_id, merge,
                                      multiple=multiple)
    resp = torch.zeros(packing.total, dtype=torch.bool, device=ids.device)
    resp[: packing.tokens] = mb["response_mask"].bool().reshape(-1)[packing.index]
    return PackedMicro(input_ids=stream, position_ids=positions, packing=packing, labels=stream[0, 1:],
                       keep=resp[1:])
