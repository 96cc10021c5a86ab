"""Published Qwen2.5-VL architectures as HF ``config.json`` dicts, for planning and recipes.

No model hub is reachable from CI, so the memory planner, the recipes and the benchmarks need the
released sizes without downloading them. Only architecture fields live here (no weights); a real
run still points ``actor.model.hf_dir`` at a checkpoint, whose own ``config.json`` then rules.
"""
from __future__ import annotations

import copy
from typing import Any, Dict

# The vision tower is the same 32-block ViT in every released size; only its output width follows the LM.
_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
               temporal_patch_size=2, in_channels=3, spatial_merge_size=2, window_size=112,
               fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, hidden_act="silu")

# name -> (hidden, layers, heads, kv heads, ffn, vocab, tied embeddings)
_TEXT = {
    "qwen2.5-vl-3b": (2048, 36, 16, 2, 11008, 151936, True),
    "qwen2.5-vl-7b": (3584, 28, 28, 4, 18944, 152064, False),
    "qwen2.5-vl-32b": (5120, 64, 40, 8, 27648, 152064, False),
    "qwen2.5-vl-72b": (8192, 80, 64, 8, 29568, 152064, False),
}


def names() -> list:
    return sorted(_TEXT)


def hf_config_dict(name: str) -> Dict[str, Any]:
    """The architecture of a released size as a transformers-5 style config dict (``text_config`` nested)."""
    key = name.lower().replace("_", "-").replace("-instruct", "")
    if key not in _TEXT:
        raise KeyError(f"unknown Qwen2.5-VL preset {name!r}; known: {names()}")
    hidden, layers, heads, kv, ffn, vocab, tie = _TEXT[key]
    text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, rms_norm_eps=1e-6, hidden_act="silu",
                max_position_embeddings=128000, tie_word_embeddings=tie,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                bos_token_id=151643, eos_token_id=151645)
    vision = copy.deepcopy(_VISION)
    vision["out_hidden_size"] = hidden
    return {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
            "text_config": text, "vision_config": vision, "tie_word_embeddings": tie,
            "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
            "vision_end_token_id": 151653}
