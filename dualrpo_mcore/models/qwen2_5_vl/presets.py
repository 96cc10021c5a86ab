"""Qwen2.5-VL architectures as HF ``config.json`` dicts: the one place for model shapes.

No model hub is reachable from CI, so the memory planner, the recipes and the benchmarks need the
released sizes without downloading them. Only architecture fields live here (no weights); a real
run still points ``actor.model.hf_dir`` at a checkpoint, whose own ``config.json`` then rules.

Besides the released sizes (:func:`names`) it holds the small random-init shapes the tests, the CPU
demo, SFT and the benchmarks build (:func:`small_names`); each takes keyword overrides, and
:func:`tokenizer_overrides` reads the vocabulary, special ids and patch geometry a tokenizer
directory made by ``dualrpo data synth`` dictates. :func:`hf_config` returns the transformers object.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any, Callable, Dict, Optional

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
    """The released sizes (what a CLI offers as a real model)."""
    return sorted(_TEXT)


def small_names() -> list:
    """The small random-init shapes (tests, demo, SFT, benchmarks)."""
    return sorted(_SMALL)


def _key(name: str) -> str:
    return name.lower().replace("_", "-").replace("-instruct", "")


def hf_config_dict(name: str, **overrides: Any) -> Dict[str, Any]:
    """The architecture ``name`` as a transformers-5 style config dict (``text_config`` nested).
    ``overrides`` go to a small shape's builder (see its docstring); released sizes take none."""
    key = _key(name)
    if key in _SMALL:
        return _SMALL[key](**overrides)
    if key not in _TEXT:
        raise KeyError(f"unknown Qwen2.5-VL preset {name!r}; known: {names() + small_names()}")
    if overrides:
        raise TypeError(f"preset {name!r} is a released size and takes no overrides (got {sorted(overrides)}); "
                        f"point actor.model.hf_dir at a config.json to change it")
    return _released(key)


def hf_config(name: str, **overrides: Any):
    """:func:`hf_config_dict` as a ``transformers.Qwen2_5_VLConfig``."""
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(**hf_config_dict(name, **overrides))


def _released(key: str) -> Dict[str, Any]:
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


# ---------------------------------------------------------------------------------- small shapes
# Special ids of the "tiny" shape: its vocabulary is 203, the last real ids are the vision tokens.
TINY_IMAGE, TINY_VIDEO, TINY_VSTART, TINY_VEND = 200, 201, 198, 199


def _assemble(text: Dict[str, Any], vision: Dict[str, Any], ids: Dict[str, int], tie: bool) -> Dict[str, Any]:
    return {"text_config": text, "vision_config": vision, **ids, "tie_word_embeddings": tie}


def _tiny(tie: bool = False, text_layers: int = 2, vision_depth: int = 3,
          vision_overrides: Optional[Dict[str, Any]] = None, **text_overrides: Any) -> Dict[str, Any]:
    """The tests' and CPU demo's shape. Odd sizes on purpose: vocab 203 (padded on the Megatron side),
    ffn 70, GQA 6 heads / 2 groups, vision head_dim 12 and ffn 54, window 2x2 merged units with ragged
    edge windows. ``text_overrides`` change the text config; ``vision_overrides`` the vision config
    (e.g. FP8 wants widths that are multiples of 16); the merger's output follows the text width."""
    text = dict(vocab_size=203, hidden_size=96, intermediate_size=70, num_hidden_layers=text_layers,
                num_attention_heads=6, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    text.update(text_overrides)
    vision = dict(depth=vision_depth, hidden_size=48, intermediate_size=54, num_heads=4, patch_size=4,
                  temporal_patch_size=2, in_channels=3, spatial_merge_size=2, window_size=16,
                  fullatt_block_indexes=[1], out_hidden_size=text["hidden_size"])
    vision.update(vision_overrides or {})
    ids = dict(image_token_id=TINY_IMAGE, video_token_id=TINY_VIDEO, vision_start_token_id=TINY_VSTART,
               vision_end_token_id=TINY_VEND)
    return _assemble(text, vision, ids, tie)


# Benchmark shapes (weight sync, training step): name -> (hidden, ffn, layers, heads, kv heads, vocab,
# vision depth, vision width). "bench-tiny" has the tiny widths but the bench geometry (patch 14).
_BENCH = {
    "bench-tiny": (96, 70, 2, 6, 2, 203, 3, 48),
    "bench-small": (512, 1408, 4, 8, 2, 16384, 2, 256),
    "bench-medium": (1024, 2816, 8, 16, 2, 32768, 4, 512),
}


def _bench(key: str) -> Dict[str, Any]:
    h, ffn, layers, heads, kv, vocab, vdepth, vh = _BENCH[key]
    hd = h // heads
    text = dict(vocab_size=vocab, hidden_size=h, intermediate_size=ffn, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, rms_norm_eps=1e-6, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                 "mrope_section": [hd // 8, hd * 3 // 16, hd * 3 // 16]},
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision = dict(depth=vdepth, hidden_size=vh, intermediate_size=vh * 2, num_heads=max(vh // 64, 4), patch_size=14,
                  temporal_patch_size=2, in_channels=3, spatial_merge_size=2, window_size=112,
                  fullatt_block_indexes=[vdepth - 1], out_hidden_size=h)
    # the vision ids are the top of the vocabulary, as in the released tokenizer
    ids = dict(image_token_id=vocab - 3, video_token_id=vocab - 2, vision_start_token_id=vocab - 5,
               vision_end_token_id=vocab - 4)
    return _assemble(text, vision, ids, False)


_TOKEN_KEYS = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id", "image_token_id", "video_token_id",
               "vision_start_token_id", "vision_end_token_id")


def _scaled(hidden_size: int = 64, layers: int = 2, vision_depth: int = 2, vision_hidden: int = 32, *,
            vocab_size: int, bos_token_id: int, eos_token_id: int, pad_token_id: int, image_token_id: int,
            video_token_id: int, vision_start_token_id: int, vision_end_token_id: int,
            patch_size: int, temporal_patch_size: int, merge_size: int) -> Dict[str, Any]:
    """A small shape around a tokenizer (SFT, the tokenizer-backed demo): widths from ``hidden_size``
    and ``vision_hidden``; vocabulary, special ids and patch geometry as :func:`tokenizer_overrides`
    reads them. 4 text heads (2 KV groups) and vision heads of 16 dims."""
    heads = 4
    if hidden_size % (heads * 4):
        raise ValueError(f"--hidden-size {hidden_size} must be a multiple of {heads * 4} (4 heads, mrope sections)")
    if vision_hidden % 16:
        raise ValueError(f"--vision-hidden {vision_hidden} must be a multiple of 16 (heads of 16 dims)")
    half = hidden_size // heads // 2  # rotary half-dim, split over (t, h, w)
    section = [half - 2 * (half // 3), half // 3, half // 3]
    text = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=2, rms_norm_eps=1e-6,
                max_position_embeddings=4096, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                pad_token_id=pad_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section})
    vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                  num_heads=vision_hidden // 16, patch_size=patch_size, temporal_patch_size=temporal_patch_size,
                  in_channels=3, spatial_merge_size=merge_size, window_size=patch_size * merge_size * 2,
                  fullatt_block_indexes=[vision_depth - 1], out_hidden_size=hidden_size)
    ids = dict(image_token_id=image_token_id, video_token_id=video_token_id,
               vision_start_token_id=vision_start_token_id, vision_end_token_id=vision_end_token_id)
    return _assemble(text, vision, ids, False)


def tokenizer_overrides(model_dir: str) -> Dict[str, int]:
    """The overrides of the "scaled" shape that a tokenizer directory dictates: vocabulary and special
    ids (``dualrpo_tokens.json``) and patch geometry (``preprocessor_config.json``)."""
    paths = [os.path.join(model_dir, n) for n in ("dualrpo_tokens.json", "preprocessor_config.json")]
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing; a tokenizer directory from `dualrpo data synth` has it")
    with open(paths[0]) as f:
        facts = json.load(f)
    with open(paths[1]) as f:
        proc = json.load(f)
    out = {k: int(facts[k]) for k in _TOKEN_KEYS}
    out.update(patch_size=int(proc["patch_size"]), temporal_patch_size=int(proc["temporal_patch_size"]),
               merge_size=int(proc["merge_size"]))
    return out


_SMALL: Dict[str, Callable[..., Dict[str, Any]]] = {
    "tiny": _tiny,
    "scaled": _scaled,
    **{k: (lambda k=k: _bench(k)) for k in _BENCH},
}


def for_tokenizer(model_dir: str, hidden_size: int = 64, layers: int = 2, vision_depth: int = 2,
                  vision_hidden: int = 32):
    """A small ``Qwen2_5_VLConfig`` (the "scaled" preset) whose vocabulary, special ids and patch
    geometry match the tokenizer/processor in ``model_dir`` (the SFT warm start's and ``tiny_cpu``'s)."""
    return hf_config("scaled", hidden_size=hidden_size, layers=layers, vision_depth=vision_depth,
                     vision_hidden=vision_hidden, **tokenizer_overrides(model_dir))
