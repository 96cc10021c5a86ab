"""Tiny random Qwen2.5-VL configs and batches (tests, CPU demo). No model hub involved."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

IMAGE, VIDEO, VSTART, VEND = 200, 201, 198, 199


def tiny_hf_config(tie: bool = False, text_layers: int = 2, vision_depth: int = 3,
                   vision_overrides: Optional[Dict[str, Any]] = None, **text_overrides: Any):
    """Odd sizes on purpose: vocab 203 (padded on the Megatron side), ffn 70, GQA 6 heads / 2 groups,
    vision head_dim 12 and ffn 54, window 2x2 merged units with ragged edge windows.
    ``vision_overrides`` change the vision config (e.g. FP8 wants widths that are multiples of 16)."""
    from transformers import Qwen2_5_VLConfig

    text = dict(vocab_size=203, hidden_size=96, intermediate_size=70, num_hidden_layers=text_layers,
                num_attention_heads=6, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    text.update(text_overrides)
    vision = dict(depth=vision_depth, hidden_size=48, intermediate_size=54, num_heads=4, patch_size=4,
                  temporal_patch_size=2, in_channels=3, spatial_merge_size=2, window_size=16,
                  fullatt_block_indexes=[1], out_hidden_size=text["hidden_size"])
    vision.update(vision_overrides or {})
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO,
                            vision_start_token_id=VSTART, vision_end_token_id=VEND, tie_word_embeddings=tie)


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
