"""Layer ModuleSpecs: the Transformer Engine spec or Megatron's local one, and which of the two a run uses."""
from __future__ import annotations

import copy
from typing import Optional

import torch

from .precision import require_te
from .precision import te_available as _te_available

BACKENDS = ("auto", "te", "local")
"""What a user may ask for (``ModelOptions.spec_backend``, i.e. ``actor.model.spec_backend``); the one
definition: configs and command lines take their choices from here."""
RESOLVED_BACKENDS = ("te", "local")
"""What :func:`resolve_backend` returns: the spec the modules are built with, and the naming their
weights follow (TE fuses the norms into the next linear). Callers that map weight names, size
memory or export weights take one of these, never 'auto'."""


def resolve_backend(requested: str = "auto", needs_te: bool = False, *, cuda_available: Optional[bool] = None,
                    te_available: Optional[bool] = None) -> str:
    """The layer spec a run uses: 'auto' means 'te' when CUDA is available and Transformer Engine
    imports, else 'local'; ``needs_te`` (FP8) forces 'te' and, without TE, fails naming the extra.

    ``cuda_available`` / ``te_available`` default to probing this process; pass them to resolve for
    another machine (``dualrpo plan`` for the GPU nodes) or in tests. Resolve once per run and hand
    the result on: everything downstream compares against :data:`RESOLVED_BACKENDS`."""
    if requested not in BACKENDS:
        raise ValueError(f"spec_backend={requested!r}: choose one of {BACKENDS}")
    if needs_te and requested == "local":
        raise ValueError("FP8 needs the Transformer Engine spec; set spec_backend to 'te' or 'auto'")
    if requested == "local":
        return "local"
    have_te = _te_available() if te_available is None else te_available
    if requested == "te" or needs_te:
        require_te("FP8 training" if needs_te else "the Transformer Engine layer spec", available=have_te)
        return "te"
    have_cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    return "te" if have_cuda and have_te else "local"


def language_layer_spec(backend: str):
    """Qwen2 decoder layer: RMSNorm, GQA with qkv bias, SwiGLU MLP. Both specs take packed (THD)
    micro-batches: TE's attention reads ``packed_seq_params`` itself; the local spec's core attention is
    Megatron's, extended to read them (``packed_attention``)."""
    from megatron.core.models.gpt import gpt_layer_specs as g

    if backend == "te":
        return g.get_gpt_layer_with_transformer_engine_spec()
    from .packed_attention import PackedDotProductAttention

    spec = g.get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = PackedDotProductAttention
    return spec


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


def merger_linears(backend: str):
    """(fc1, fc2) of the patch merger's MLP. TE linears under the TE spec, so that ``fp8_vision``
    reaches the merger's GEMMs (Megatron's own linears never run in FP8); same weight names."""
    if backend == "te":
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear

        return TEColumnParallelLinear, TERowParallelLinear
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    return ColumnParallelLinear, RowParallelLinear
