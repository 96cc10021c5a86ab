"""Tiny random Qwen2.5-VL models and batches for tests. No model hub involved.

Not for production code: the shapes live in :mod:`.presets` (``presets.hf_config("tiny", ...)``)."""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch

from .presets import TINY_IMAGE as IMAGE
from .presets import TINY_VEND as VEND
from .presets import TINY_VIDEO as VIDEO  # noqa: F401  (part of the tests' vocabulary of names)
from .presets import TINY_VSTART as VSTART


def tiny_hf_config(**kw: Any):
    """``presets.hf_config("tiny", **kw)``: the name the tests use (see ``presets._tiny`` for ``kw``)."""
    from .presets import hf_config

    return hf_config("tiny", **kw)


def tiny_hf_model(seed: int = 0, **kw):
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_hf_config(**kw)).float().eval()
    # HF init leaves norms at 1 and biases at 0: randomise them so the mapping of every tensor is tested.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_q" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def make_batch(seed: int = 0, rows: Sequence[Sequence[Tuple[int, int]]] = ((), ((6, 8),), ((4, 10), (6, 6))),
               text_len: int = 5, patch_dim: int = 96, merge: int = 2, vocab: int = 198
               ) -> Dict[str, Any]:
    """A right-padded batch; row r holds the images (grid h, w in patches) listed in ``rows[r]``,
    each wrapped in vision start/end tokens between runs of random text."""
    g = torch.Generator().manual_seed(seed)
    seqs: List[List[int]] = []
    grids: List[List[int]] = []
    for r, images in enumerate(rows):
        ids = torch.randint(3, vocab, (text_len + r,), generator=g).tolist()
        for h, w in images:
            ids += [VSTART] + [IMAGE] * (h * w // merge ** 2) + [VEND]
            ids += torch.randint(3, vocab, (3,), generator=g).tolist()
            grids.append([1, h, w])
        seqs.append(ids)
    s = max(len(x) for x in seqs)
    input_ids = torch.zeros(len(seqs), s, dtype=torch.long)
    attention_mask = torch.zeros(len(seqs), s, dtype=torch.long)
    for r, ids in enumerate(seqs):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        attention_mask[r, : len(ids)] = 1
    n_patches = sum(h * w for _, h, w in grids)
    out: Dict[str, Any] = dict(input_ids=input_ids, attention_mask=attention_mask)
    if grids:
        out["pixel_values"] = torch.randn(n_patches, patch_dim, generator=g)
        out["image_grid_thw"] = torch.tensor(grids)
    return out


def hf_forward(model, batch: Dict[str, Any]) -> torch.Tensor:
    """Logits of the transformers model on ``batch`` (it computes its own 3D positions)."""
    kw = dict(batch)
    kw["mm_token_type_ids"] = (batch["input_ids"] == IMAGE).int()
    return model(**kw).logits
