"""Precision switch: fp32 / bf16 / fp16 weights and the FP8 (Transformer Engine) settings.

FP8 is a config choice mapped onto Megatron-Core's own fields (``fp8`` format and ``fp8_recipe``);
it needs the Transformer Engine layer spec, so without TE it fails at start, naming the extra.

FP8 GEMMs also constrain shapes: the token count of every GEMM input (the product of its leading
dims) must be a multiple of :attr:`Precision.token_multiple`. Megatron-Core's
``fp8_utils.get_fp8_align_size`` gives 16 for the per-tensor and blockwise recipes and 32 for MXFP8;
TE's forward only asserts 8 (``assert_dim_for_fp8_exec``), but the weight-gradient GEMM contracts
over the tokens and cuBLAS wants that leading dimension a multiple of 16 (``cublaslt_gemm.cu``:
"Caller must pad"), and MXFP8 scales blocks of 32 along it. The actor pads micro-batches and the ViT
pads its patch sequence to this multiple, with the padding masked out.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

import torch

TE_EXTRA_HINT = "pip install dualrpo-mcore[te]"
FP8_FORMATS = ("hybrid", "e4m3")
# Tokens per FP8 GEMM must be a multiple of this (module docstring); one table, read everywhere.
FP8_TOKEN_MULTIPLE = {"delayed": 16, "tensorwise": 16, "blockwise": 16, "mxfp8": 32}
FP8_RECIPES = tuple(FP8_TOKEN_MULTIPLE)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PARTS = ("language", "vision", "merger")


def te_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken TE install is as unusable as a missing one
        return False
    return True


def require_te(why: str, available: Optional[bool] = None) -> None:
    """Raise, naming the extra, unless TE imports (``available`` overrides the probe)."""
    if not (te_available() if available is None else available):
        raise RuntimeError(f"{why} needs NVIDIA Transformer Engine, which is not importable here; "
                           f"install it with `{TE_EXTRA_HINT}` (CUDA only).")


def check_fields(dtype: str, fp8: Optional[str], fp8_recipe: str, fp8_amax_history_len: int,
                 names: Mapping[str, str]) -> None:
    """The precision rules, once: :class:`Precision` and the trainer's model config both call this,
    each with its own field ``names`` (so an error names the field the user actually set)."""
    if dtype not in DTYPES:
        raise ValueError(f"{names['dtype']}={dtype!r}: choose one of {sorted(DTYPES)}")
    if fp8 is not None and fp8 not in FP8_FORMATS:
        raise ValueError(f"{names['fp8']}={fp8!r}: choose one of {FP8_FORMATS} or None")
    if fp8_recipe not in FP8_RECIPES:
        raise ValueError(f"{names['fp8_recipe']}={fp8_recipe!r}: choose one of {FP8_RECIPES}")
    if fp8_amax_history_len < 1:
        raise ValueError(f"{names['fp8_amax_history_len']}={fp8_amax_history_len}: must be >= 1")
    if fp8 is not None and dtype == "fp32":
        raise ValueError(f"{names['fp8']}={fp8!r} needs dtype 'bf16' or 'fp16' for the non-FP8 parts "
                         f"(set {names['dtype']})")


@dataclass
class Precision:
    """Numeric format of the policy."""

    dtype: str = "fp32"
    """Parameter/activation dtype: 'fp32', 'bf16' or 'fp16'."""
    fp8: Optional[str] = None
    """None (off), 'hybrid' (e4m3 forward, e5m2 gradients) or 'e4m3' (both): TE GEMMs in FP8."""
    fp8_recipe: str = "delayed"
    """FP8 scaling: 'delayed' (amax history), 'tensorwise' (current scaling), 'blockwise' (128-blocks,
    Hopper) or 'mxfp8' (32-blocks, Blackwell)."""
    fp8_amax_history_len: int = 1024
    """Delayed scaling: amax history length."""
    fp8_vision: bool = False
    """Also run the vision tower and merger in FP8 (off by default: tiny GEMMs gain nothing)."""

    def __post_init__(self) -> None:
        check_fields(self.dtype, self.fp8, self.fp8_recipe, self.fp8_amax_history_len,
                     {f.name: f"precision.{f.name}" for f in dataclasses.fields(self)})

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def uses_te(self) -> bool:
        """FP8 is only implemented by the Transformer Engine spec."""
        return self.fp8 is not None

    @property
    def token_multiple(self) -> int:
        """Tokens of every FP8 GEMM input must be a multiple of this; 1 without FP8."""
        return FP8_TOKEN_MULTIPLE[self.fp8_recipe] if self.fp8 is not None else 1

    def check_runtime(self) -> None:
        """Called when the model is built: FP8 without TE stops here with the install hint."""
        if self.uses_te:
            require_te(f"precision.fp8={self.fp8!r}")

    def for_part(self, part: str) -> "Precision":
        """The precision one sub-module runs in: the ViT and merger drop FP8 unless ``fp8_vision``."""
        if part not in PARTS:
            raise ValueError(f"part={part!r}: choose one of {PARTS}")
        if part == "language" or self.fp8_vision:
            return self
        return dataclasses.replace(self, fp8=None)

    def transformer_kwargs(self) -> Dict[str, Any]:
        kw: Dict[str, Any] = dict(params_dtype=self.torch_dtype, pipeline_dtype=self.torch_dtype,
                                  bf16=self.dtype == "bf16", fp16=self.dtype == "fp16")
        if self.fp8 is not None:
            kw.update(fp8=self.fp8, fp8_recipe=self.fp8_recipe,
                      fp8_amax_history_len=self.fp8_amax_history_len,
                      fp8_amax_compute_algo="max")
        return kw


def check_pad_tokens_to(pad_tokens_to: Optional[int], precision: "Precision", name: str) -> None:
    """A forced token multiple must still satisfy the FP8 GEMMs (it replaces their requirement)."""
    if pad_tokens_to is None:
        return
    if isinstance(pad_tokens_to, bool) or not isinstance(pad_tokens_to, int) or pad_tokens_to < 1:
        raise ValueError(f"{name}={pad_tokens_to!r}: must be a positive int or None")
    need = precision.token_multiple
    if pad_tokens_to % need:
        raise ValueError(f"{name}={pad_tokens_to}: FP8 recipe {precision.fp8_recipe!r} needs a multiple of {need}")


def fp8_context(config):
    """The FP8 autocast region for modules built from the TransformerConfig ``config``.

    Megatron's TransformerBlock opens this itself around the LM's layers; modules that run their
    layers outside a block (the ViT, the merger) must open it here, or their TE GEMMs silently stay
    in bf16 whatever ``config.fp8`` says."""
    if not getattr(config, "fp8", None):
        return contextlib.nullcontext()
    from megatron.core.fp8_utils import get_fp8_context

    return get_fp8_context(config)
