"""Qwen2.5-VL configuration: a Hugging Face ``config.json`` read into Megatron TransformerConfigs.

Three TransformerConfigs come out: the language model (GPTModel with mrope), the vision encoder and
the patch merger. Everything that makes the Megatron modules compute exactly what transformers'
``Qwen2_5_VLForConditionalGeneration`` computes (norm eps, biases, gated SiLU, no fusions that
change numerics in fp32) is fixed here, in one place.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .precision import Precision

# Qwen's vision tower hard-codes this eps in its RMSNorms (it is not in config.json).
VISION_NORM_EPS = 1e-6


def _as_dict(hf_config: Any) -> Dict[str, Any]:
    if isinstance(hf_config, (str, os.PathLike)):
        path = os.path.join(hf_config, "config.json") if os.path.isdir(hf_config) else hf_config
        with open(path) as f:
            return json.load(f)
    if isinstance(hf_config, dict):
        return dict(hf_config)
    return hf_config.to_dict()


def _text_section(cfg: Dict[str, Any]) -> Dict[str, Any]:
    # transformers 5 nests the LM under "text_config"; 4.x checkpoints keep it at the top level.
    text = dict(cfg.get("text_config") or {})
    for k, v in cfg.items():
        if k not in ("text_config", "vision_config"):
            text.setdefault(k, v)
    return text


def _rope(text: Dict[str, Any]) -> tuple[float, List[int]]:
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    theta = rope.get("rope_theta", text.get("rope_theta", 1000000.0))
    section = rope.get("mrope_section") or [16, 24, 24]
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "mrope"):
        raise ValueError(f"config.json: rope type {kind!r} is not supported (only default mrope)")
    return float(theta), [int(s) for s in section]


@dataclass
class QwenVLConfig:
    """Everything the Megatron Qwen2.5-VL model needs, resolved from one HF config."""

    hf: Dict[str, Any] = field(repr=False)
    # language model
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    ffn_hidden_size: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: List[int]
    max_position_embeddings: int
    tie_word_embeddings: bool
    # special tokens
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    # vision tower
    vision_hidden_size: int
    vision_depth: int
    vision_heads: int
    vision_ffn_hidden_size: int
    patch_size: int
    temporal_patch_size: int
    in_channels: int
    spatial_merge_size: int
    window_size: int
    fullatt_block_indexes: List[int]
    tokens_per_second: float
    vision_rope_theta: float
    out_hidden_size: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def vision_head_dim(self) -> int:
        return self.vision_hidden_size // self.vision_heads

    @property
    def merger_hidden_size(self) -> int:
        return self.vision_hidden_size * self.spatial_merge_size ** 2

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    def padded_vocab_size(self, divisible_by: int = 128) -> int:
        """Vocab rounded up so every TP degree up to ``divisible_by`` splits it evenly (Megatron's
        convention); padded rows are zero and their logits are ignored downstream."""
        return -(-self.vocab_size // divisible_by) * divisible_by


def from_hf(hf_config: Any) -> QwenVLConfig:
    """Read a HF Qwen2.5-VL config (path, dict or ``Qwen2_5_VLConfig``)."""
    cfg = _as_dict(hf_config)
    text, vis = _text_section(cfg), dict(cfg.get("vision_config") or {})
    for name, sub in (("text_config", text), ("vision_config", vis)):
        act = sub.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config.json {name}.hidden_act={act!r}: only 'silu' is supported")
    if text.get("use_sliding_window"):
        raise ValueError("config.json: use_sliding_window=True is not supported")
    theta, section = _rope(text)
    heads = int(text["num_attention_heads"])
    head_dim = int(text["hidden_size"]) // heads
    if sum(section) * 2 != head_dim:
        raise ValueError(f"config.json: mrope_section {section} must sum to head_dim/2 = {head_dim // 2}")
    vrope = vis.get("rope_parameters") or {}
    patch = vis.get("patch_size", 14)
    tpatch = vis.get("temporal_patch_size", 2)
    return QwenVLConfig(
        hf=cfg,
        vocab_size=int(text["vocab_size"]), hidden_size=int(text["hidden_size"]),
        num_layers=int(text["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=int(text.get("num_key_value_heads") or heads),
        ffn_hidden_size=int(text["intermediate_size"]),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)), rope_theta=theta, mrope_section=section,
        max_position_embeddings=int(text.get("max_position_embeddings", 32768)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        image_token_id=int(cfg.get("image_token_id", 151655)),
        video_token_id=int(cfg.get("video_token_id", 151656)),
        vision_start_token_id=int(cfg.get("vision_start_token_id", 151652)),
        vision_hidden_size=int(vis.get("hidden_size", 1280)), vision_depth=int(vis.get("depth", 32)),
        vision_heads=int(vis.get("num_heads", 16)),
        vision_ffn_hidden_size=int(vis.get("intermediate_size", 3420)),
        patch_size=int(patch if isinstance(patch, int) else patch[0]),
        temporal_patch_size=int(tpatch if isinstance(tpatch, int) else tpatch[0]),
        in_channels=int(vis.get("in_channels", 3)), spatial_merge_size=int(vis.get("spatial_merge_size", 2)),
        window_size=int(vis.get("window_size", 112)),
        fullatt_block_indexes=[int(i) for i in vis.get("fullatt_block_indexes", (7, 15, 23, 31))],
        tokens_per_second=float(vis.get("tokens_per_second", 2)),
        vision_rope_theta=float(vrope.get("rope_theta", 10000.0)),
        out_hidden_size=int(vis.get("out_hidden_size", text["hidden_size"])),
    )


RECOMPUTE = ("none", "selective", "full")


def recompute_kwargs(mode: str) -> Dict[str, Any]:
    """Megatron's recomputation fields for one of :data:`RECOMPUTE`. 'full' re-runs every layer
    (uniform, one layer per checkpoint: activations shrink to one hidden state per layer);
    'selective' re-runs only the attention core, whose score matrix dominates at long sequence."""
    if mode not in RECOMPUTE:
        raise ValueError(f"recompute={mode!r}: choose one of {RECOMPUTE}")
    if mode == "full":
        return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if mode == "selective":
        return dict(recompute_granularity="selective")
    return {}


def _common(precision: Precision, tp: int) -> Dict[str, Any]:
    """Settings shared by all three configs: exact (unfused) numerics, no dropout."""
    return dict(
        tensor_model_parallel_size=tp, sequence_parallel=False,
        hidden_dropout=0.0, attention_dropout=0.0,
        normalization="RMSNorm", attention_softmax_in_fp32=True,
        bias_dropout_fusion=False, bias_activation_fusion=False, apply_rope_fusion=False,
        masked_softmax_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        rotary_interleaved=False,
        use_cpu_initialization=not torch.cuda.is_available(),
        **precision.transformer_kwargs(),
    )


def _transformer_config(part: str, precision: Optional[Precision], tp: int, overrides: Dict[str, Any],
                        **fields: Any):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kw = _common((precision or Precision()).for_part(part), tp)
    kw.update(fields)
    kw.update(overrides)
    return TransformerConfig(**kw)


def language_config(cfg: QwenVLConfig, tp: int = 1, pp: int = 1, precision: Optional[Precision] = None,
                    **overrides: Any):
    return _transformer_config(
        "language", precision, tp, overrides,
        pipeline_model_parallel_size=pp,
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_heads,
        num_query_groups=cfg.num_kv_heads, kv_channels=cfg.head_dim, ffn_hidden_size=cfg.ffn_hidden_size,
        layernorm_epsilon=cfg.rms_norm_eps, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, add_qkv_bias=True, mrope_section=list(cfg.mrope_section),
        init_method_std=float(cfg.hf.get("initializer_range", 0.02)),
        # gloo has no batched isend/irecv: plain p2p between pipeline stages off-GPU.
        batch_p2p_comm=torch.cuda.is_available(),
    )


def vision_config(cfg: QwenVLConfig, tp: int = 1, precision: Optional[Precision] = None, **overrides: Any):
    """The ViT lives whole on the first pipeline stage, hence pipeline size 1 here."""
    return _transformer_config(
        "vision", precision, tp, overrides,
        pipeline_model_parallel_size=1,
        num_layers=cfg.vision_depth, hidden_size=cfg.vision_hidden_size,
        num_attention_heads=cfg.vision_heads, num_query_groups=cfg.vision_heads,
        kv_channels=cfg.vision_head_dim, ffn_hidden_size=cfg.vision_ffn_hidden_size,
        layernorm_epsilon=VISION_NORM_EPS, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=True, add_qkv_bias=True,
    )


def merger_config(cfg: QwenVLConfig, tp: int = 1, precision: Optional[Precision] = None, **overrides: Any):
    """Merger MLP: RMSNorm(vision) -> fc1 (4*vision -> 4*vision) -> exact GELU -> fc2 (-> LM hidden)."""
    return _transformer_config(
        "merger", precision, tp, overrides,
        pipeline_model_parallel_size=1, num_layers=1, hidden_size=cfg.out_hidden_size,
        num_attention_heads=max(1, tp), ffn_hidden_size=cfg.merger_hidden_size,
        layernorm_epsilon=VISION_NORM_EPS, gated_linear_unit=False, activation_func=F.gelu,
        add_bias_linear=True,
    )


def check_parallel(cfg: QwenVLConfig, tp: int, pp: int) -> None:
    """Fail early, naming the field, when a TP/PP choice cannot split this model."""
    checks: Sequence[tuple[str, int, str, int]] = (
        ("text_config.num_attention_heads", cfg.num_heads, "tensor", tp),
        ("text_config.num_key_value_heads", cfg.num_kv_heads, "tensor", tp),
        ("text_config.intermediate_size", cfg.ffn_hidden_size, "tensor", tp),
        ("vision_config.num_heads", cfg.vision_heads, "tensor", tp),
        ("vision_config.intermediate_size", cfg.vision_ffn_hidden_size, "tensor", tp),
        ("text_config.num_hidden_layers", cfg.num_layers, "pipeline", pp),
    )
    for name, value, kind, by in checks:
        if value % by:
            raise ValueError(f"config.json {name}={value} is not divisible by {kind} parallel size {by}")
    if cfg.merger_hidden_size % tp:
        raise ValueError(f"merger hidden size {cfg.merger_hidden_size} is not divisible by tp={tp}")
