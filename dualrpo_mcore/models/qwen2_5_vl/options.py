"""How to build the policy beyond what its config.json says: numeric format, layer spec, recomputation.

Defined once here. The trainer's model section (``actor.model``,
:class:`dualrpo_mcore.actor.config.ModelSourceConfig`) is these options plus where the weights come
from, so a field, its docstring and its check exist in one place; :class:`~.model.QwenVLModel` takes
either. Light on purpose (no Megatron import): configs are built and checked before any model is.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Optional

from .precision import Precision, check_fields, check_pad_tokens_to
from .specs import BACKENDS, RESOLVED_BACKENDS, resolve_backend


@dataclass
class ModelOptions:
    """Build options of the Qwen2.5-VL policy."""

    precision: str = "fp32"
    """Parameter dtype: 'fp32', 'bf16' or 'fp16'."""
    fp8: Optional[str] = None
    """FP8 GEMMs through Transformer Engine: None (off), 'hybrid' (e4m3 forward, e5m2 gradients) or
    'e4m3'. Needs ``precision`` bf16/fp16, a spec_backend other than 'local', and the ``te`` extra."""
    fp8_recipe: str = "delayed"
    """FP8 scaling: 'delayed', 'tensorwise', 'blockwise' (Hopper) or 'mxfp8' (Blackwell)."""
    fp8_amax_history_len: int = 1024
    """Delayed scaling: amax history length."""
    fp8_vision: bool = False
    """Run the ViT and the merger in FP8 too (only with ``fp8``)."""
    pad_tokens_to: Optional[int] = None
    """Pad micro-batches (and ViT patches) to a multiple of this many tokens (masked out); None = what
    ``fp8`` needs (16, 32 for mxfp8; no padding without FP8). Exists to run the FP8 padding on CPU. The
    ViT pads its patches itself; LM batches must arrive padded (``trainer.microbatch``)."""
    spec_backend: str = "auto"
    """Megatron layer spec, one of ``specs.BACKENDS``: 'local' (CPU, no Transformer Engine), 'te', or
    'auto' (TE with CUDA and TE importable). A run resolves it once (:meth:`resolve_backend`) and builds
    the model from :meth:`with_backend`; the built model keeps the result as ``QwenVLModel.backend``."""
    recompute: str = "none"
    """Activation recomputation of the language model: 'none', 'selective' (attention core) or 'full'
    (every layer's input is kept, the layer re-run in backward)."""
    dedup_images: bool = True
    """Encode each distinct image of a batch once (GRPO's G rows of a prompt share its image); the
    result is the same, the ViT's compute and activations shrink by up to G. See ``image_dedup``."""
    vocab_divisible_by: int = 128
    """The embedding/output rows are padded to a multiple of this (and of TP)."""

    path: ClassVar[str] = "model"
    """Dotted path of these fields in their config tree (the trainer's subclass: 'actor.model'): errors name it."""

    def __post_init__(self) -> None:
        from .config import RECOMPUTE  # Megatron's config classes: imported when a config is checked

        p = self.path
        if self.spec_backend not in BACKENDS:
            raise ValueError(f"{p}.spec_backend={self.spec_backend!r}: choose one of {BACKENDS}")
        check_fields(self.precision, self.fp8, self.fp8_recipe, self.fp8_amax_history_len,
                     dict(dtype=f"{p}.precision", fp8=f"{p}.fp8", fp8_recipe=f"{p}.fp8_recipe",
                          fp8_amax_history_len=f"{p}.fp8_amax_history_len"))
        if self.fp8 is not None and self.spec_backend == "local":
            raise ValueError(f"{p}.fp8={self.fp8!r} needs the Transformer Engine spec; "
                             f"set {p}.spec_backend to 'te' or 'auto'")
        if self.fp8_vision and self.fp8 is None:
            raise ValueError(f"{p}.fp8_vision=True does nothing without {p}.fp8; set both")
        check_pad_tokens_to(self.pad_tokens_to, self.precision_config(), f"{p}.pad_tokens_to")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"{p}.recompute={self.recompute!r}: choose one of {RECOMPUTE}")
        if self.vocab_divisible_by < 1:
            raise ValueError(f"{p}.vocab_divisible_by must be >= 1, got {self.vocab_divisible_by}")

    def precision_config(self) -> Precision:
        """The model's :class:`Precision` (dtype and FP8 settings) from these fields."""
        return Precision(dtype=self.precision, fp8=self.fp8, fp8_recipe=self.fp8_recipe,
                         fp8_amax_history_len=self.fp8_amax_history_len, fp8_vision=self.fp8_vision)

    def resolve_backend(self, *, cuda_available: Optional[bool] = None, te_available: Optional[bool] = None) -> str:
        """'te' or 'local' for this run (``specs.resolve_backend``: FP8 without TE fails here, naming the
        extra). Call once at start and pass the result on; ``spec_backend`` itself may say 'auto'."""
        return resolve_backend(self.spec_backend, needs_te=self.fp8 is not None, cuda_available=cuda_available,
                               te_available=te_available)

    def with_backend(self, backend: str) -> "ModelOptions":
        """Just these options (a plain :class:`ModelOptions`, whatever subclass ``self`` is) with the
        run's resolved ``backend``, which the model builds from as is."""
        if backend not in RESOLVED_BACKENDS:
            raise ValueError(f"backend={backend!r}: pass the resolved backend ({RESOLVED_BACKENDS}), "
                             f"from resolve_backend()")
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(ModelOptions)}
        values["spec_backend"] = backend
        return ModelOptions(**values)

    @property
    def token_multiple(self) -> int:
        """Language-model micro-batches' ``B * S`` is padded to a multiple of this."""
        return self.part_token_multiple("language")

    def part_token_multiple(self, part: str) -> int:
        """Tokens of ``part``'s GEMM inputs ('language' or 'vision') are padded to a multiple of this."""
        return self.pad_tokens_to or self.precision_config().for_part(part).token_multiple
