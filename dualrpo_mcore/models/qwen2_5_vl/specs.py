"""Layer ModuleSpecs: the Transformer Engine spec where TE imports, Megatron's local spec otherwise."""
from __future__ import annotations

import copy

from .precision import require_te, te_available

BACKENDS = ("auto", "te", "local")


def resolve_backend(backend: str = "auto", needs_te: bool = False) -> str:
    """'auto' picks TE when it imports (GPU clusters) and the local spec otherwise (CPU, CI)."""
    if backend not in BACKENDS:
        raise ValueError(f"model.backend={backend!r}: choose one of {BACKENDS}")
    if needs_te and backend == "local":
        raise ValueError("FP8 needs the Transformer Engine spec; set model.backend to 'te' or 'auto'")
    if backend == "te" or needs_te:
        require_te("the Transformer Engine layer spec" if not needs_te else "FP8 training")
        return "te"
    if backend == "auto":
        return "te" if te_available() else "local"
    return "local"


def language_layer_spec(backend: str):
    """Qwen2 decoder layer: RMSNorm, GQA with qkv bias, SwiGLU MLP."""
    from megatron.core.models.gpt import gpt_layer_specs as g

    if backend == "te":
        return g.get_gpt_layer_with_transformer_engine_spec()
    return g.get_gpt_layer_local_spec(normalization="RMSNorm")


def vision_layer_spec(backend: str):
    """Qwen2.5-VL ViT block: the decoder layer with a non-causal attention whose (window or
    full, block-diagonal per image) mask is passed in per layer."""
    from megatron.core.transformer.enums import AttnMaskType

    spec = copy.deepcopy(language_layer_spec(backend))
    spec.submodules.self_attention.params = {"attn_mask_type": AttnMaskType.arbitrary}
    return spec


def norm_module(backend: str):
    """Standalone RMSNorm (merger ln_q)."""
    if backend == "te":
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    return WrappedTorchNorm
