"""Precision switch: fp32 / bf16 / fp16 weights and the FP8 (Transformer Engine) settings.

FP8 is a config choice mapped onto Megatron-Core's own fields (``fp8`` format and ``fp8_recipe``);
it needs the Transformer Engine layer spec, so without TE it fails at start, naming the extra.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

TE_EXTRA_HINT = "pip install dualrpo-mcore[te]"
FP8_FORMATS = ("hybrid", "e4m3")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def te_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken TE install is as unusable as a missing one
        return False
    return True


def require_te(why: str) -> None:
    if not te_available():
        raise RuntimeError(f"{why} needs NVIDIA Transformer Engine, which is not importable here; "
                           f"install it with `{TE_EXTRA_HINT}` (CUDA only).")


@dataclass
class Precision:
    """Numeric format of the policy."""

    dtype: str = "fp32"
    """Parameter/activation dtype: 'fp32', 'bf16' or 'fp16'."""
    fp8: Optional[str] = None
    """None (off), 'hybrid' (e4m3 forward, e5m2 gradients) or 'e4m3' (both): TE GEMMs in FP8."""
    fp8_recipe: str = "delayed"
    """FP8 scaling: 'delayed' (amax history), 'tensorwise' (current scaling) or 'blockwise'."""
    fp8_amax_history_len: int = 1024
    """Delayed scaling: amax history length."""
    fp8_vision: bool = False
    """Also run the vision tower and merger in FP8 (off by default: tiny GEMMs gain nothing)."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"precision.dtype={self.dtype!r}: choose one of {sorted(DTYPES)}")
        if self.fp8 is not None and self.fp8 not in FP8_FORMATS:
            raise ValueError(f"precision.fp8={self.fp8!r}: choose one of {FP8_FORMATS} or None")
        if self.fp8_recipe not in FP8_RECIPES:
            raise ValueError(f"precision.fp8_recipe={self.fp8_recipe!r}: choose one of {FP8_RECIPES}")
        if self.fp8 is not None and self.dtype == "fp32":
            raise ValueError("precision.fp8 needs dtype 'bf16' or 'fp16' for the non-FP8 parts")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def uses_te(self) -> bool:
        """FP8 is only implemented by the Transformer Engine spec."""
        return self.fp8 is not None

    def check_runtime(self) -> None:
        """Called when the model is built: FP8 without TE stops here with the install hint."""
        if self.uses_te:
            require_te(f"precision.fp8={self.fp8!r}")

    def for_vision(self) -> "Precision":
        return self if self.fp8_vision else dataclasses.replace(self, fp8=None)

    def transformer_kwargs(self) -> Dict[str, Any]:
        kw: Dict[str, Any] = dict(params_dtype=self.torch_dtype, pipeline_dtype=self.torch_dtype,
                                  bf16=self.dtype == "bf16", fp16=self.dtype == "fp16")
        if self.fp8 is not None:
            kw.update(fp8=self.fp8, fp8_recipe=self.fp8_recipe,
                      fp8_amax_history_len=self.fp8_amax_history_len,
                      fp8_amax_compute_algo="max")
        return kw
