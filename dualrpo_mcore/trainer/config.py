"""Typed configuration of the Megatron actor (the RL loop's config tree adds its own branches).

Every field has a docstring and ``__post_init__`` checks names a bad field by its dotted path.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from dualrpo_mcore.algo import CERTAINTY_NORMALIZERS, DEFAULT_NORMALIZER, PolicyLossConfig
from dualrpo_mcore.models.qwen2_5_vl.precision import Precision, check_fields, check_pad_tokens_to
from dualrpo_mcore.models.qwen2_5_vl.specs import BACKENDS, resolve_backend
from dualrpo_mcore.models.qwen2_5_vl.training import ModuleTraining

COMM_BACKENDS = ("nccl", "gloo")


@dataclass
class ModelSourceConfig:
    """Where the policy's architecture and weights come from (exactly one source)."""

    hf_dir: Optional[str] = None
    """A Hugging Face Qwen2.5-VL directory (config.json + safetensors); weights are resharded on load."""
    megatron_ckpt: Optional[str] = None
    """A Megatron checkpoint written by ``dualrpo convert`` (any TP/PP); loaded through ``convert.load_into``."""
    tiny: bool = False
    """Randomly initialised tiny Qwen2.5-VL (tests, CPU demo): ``testing.tiny_hf_config(**tiny_overrides)``."""
    tiny_overrides: Dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of ``tiny_hf_config`` (text-config overrides, ``tie``, layer counts)."""
    hf_config: Any = None
    """A ready HF config (object or dict) used with ``tiny`` instead of ``tiny_hf_config``."""
    preset: Optional[str] = None
    """A released architecture from ``models.qwen2_5_vl.presets`` (e.g. 'qwen2.5-vl-7b'), randomly
    initialised: memory planning and throughput benchmarks need the shapes, not the weights."""
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
    """Pad micro-batches (and ViT patches) to a multiple of this many tokens; None = what ``fp8``
    needs (16, 32 for mxfp8; no padding without FP8). Exists to run the FP8 padding on CPU."""
    spec_backend: str = "local"
    """Megatron layer spec: 'local' (CPU, no Transformer Engine), 'te' or 'auto' (TE with CUDA and
    TE importable); resolved once at start by :meth:`resolve_backend`."""
    training: ModuleTraining = field(default_factory=ModuleTraining)
    """Per-module freezing and learning-rate multipliers (ViT, merger, LM)."""
    recompute: str = "none"
    """Activation recomputation in the language model: 'none', 'selective' or 'full'."""
    dedup_images: bool = True
    """Run the ViT once per distinct image of a batch (the G rows of a group share one); same numbers."""

    def __post_init__(self) -> None:
        given = [n for n in ("hf_dir", "megatron_ckpt", "preset") if getattr(self, n)] + (["tiny"] if self.tiny else [])
        if len(given) != 1:
            raise ValueError(f"actor.model: give exactly one of hf_dir, megatron_ckpt, preset, tiny "
                             f"(got {given or 'none'})")
        if self.preset:
            from dualrpo_mcore.models.qwen2_5_vl import presets

            presets.hf_config_dict(self.preset)  # an unknown name fails here, listing the known ones
        if self.spec_backend not in BACKENDS:
            raise ValueError(f"actor.model.spec_backend={self.spec_backend!r}: choose one of {BACKENDS}")
        check_fields(self.precision, self.fp8, self.fp8_recipe, self.fp8_amax_history_len,
                     dict(dtype="actor.model.precision", fp8="actor.model.fp8", fp8_recipe="actor.model.fp8_recipe",
                          fp8_amax_history_len="actor.model.fp8_amax_history_len"))
        if self.fp8 is not None and self.spec_backend == "local":
            raise ValueError(f"actor.model.fp8={self.fp8!r} needs the Transformer Engine spec; "
                             f"set actor.model.spec_backend to 'te' or 'auto'")
        if self.fp8_vision and self.fp8 is None:
            raise ValueError("actor.model.fp8_vision=True does nothing without actor.model.fp8; set both")
        check_pad_tokens_to(self.pad_tokens_to, self.precision_config(), "actor.model.pad_tokens_to")
        if isinstance(self.training, dict):
            self.training = ModuleTraining(**self.training)
        from dualrpo_mcore.models.qwen2_5_vl.config import RECOMPUTE

        if self.recompute not in RECOMPUTE:
            raise ValueError(f"actor.model.recompute={self.recompute!r}: choose one of {RECOMPUTE}")

    def precision_config(self) -> Precision:
        """The model's :class:`Precision` (dtype and FP8 settings) from these fields."""
        return Precision(dtype=self.precision, fp8=self.fp8, fp8_recipe=self.fp8_recipe,
                         fp8_amax_history_len=self.fp8_amax_history_len, fp8_vision=self.fp8_vision)

    def resolve_backend(self, *, cuda_available: Optional[bool] = None, te_available: Optional[bool] = None) -> str:
        """'te' or 'local' for this run (``specs.resolve_backend``: FP8 without TE fails here, naming the
        extra). Call once at start and pass the result on; ``spec_backend`` itself may say 'auto'."""
        return resolve_backend(self.spec_backend, needs_te=self.fp8 is not None, cuda_available=cuda_available,
                               te_available=te_available)

    @property
    def token_multiple(self) -> int:
        """Micro-batches' ``B * S`` is padded to a multiple of this."""
        return self.pad_tokens_to or self.precision_config().token_multiple


@dataclass
class ParallelConfig:
    """Model parallelism of the actor; data parallelism is world size / (tp * pp)."""

    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    backend: Optional[str] = None
    """Collective backend: 'nccl', 'gloo', or None (nccl with CUDA, else gloo)."""

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1:
            raise ValueError(f"actor.parallel: tp and pp must be >= 1 (got tp={self.tp}, pp={self.pp})")
        if self.backend is not None and self.backend not in COMM_BACKENDS:
            raise ValueError(f"actor.parallel.backend={self.backend!r}: choose one of {COMM_BACKENDS} or None")


@dataclass
class OptimConfig:
    """Adam through Megatron's optimizer, with the paper's schedule (warm-up, then constant)."""

    lr: float = 1e-6
    """Peak learning rate (paper: 1e-6)."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW); biases and norms are exempt, as in Megatron."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 = off)."""
    warmup_fraction: float = 0.05
    """Fraction of all updates with linear warm-up (paper: 5%), then constant."""
    decay_fraction: float = 0.0
    """Fraction of all updates, at the end, over which the rate falls linearly towards 0 (paper: none)."""
    total_steps: int = 1
    """Number of optimizer updates the run will take (sets the warm-up length); the loop fills it in."""
    distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (Megatron's distributed optimizer)."""

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"actor.optim.lr must be > 0, got {self.lr}")
        if not self.weight_decay >= 0:
            raise ValueError(f"actor.optim.weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"actor.optim.{name} must lie in [0, 1), got {getattr(self, name)}")
        if not self.adam_eps > 0:
            raise ValueError(f"actor.optim.adam_eps must be > 0, got {self.adam_eps}")
        if not self.grad_clip >= 0:
            raise ValueError(f"actor.optim.grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"actor.optim.warmup_fraction must lie in [0, 1), got {self.warmup_fraction}")
        if not 0.0 <= self.decay_fraction < 1.0:
            raise ValueError(f"actor.optim.decay_fraction must lie in [0, 1), got {self.decay_fraction}")
        if self.total_steps < 1:
            raise ValueError(f"actor.optim.total_steps must be >= 1, got {self.total_steps}")


@dataclass
class MicroBatchConfig:
    """How a batch is cut into micro-batches for forward/backward."""

    max_tokens: int = 8192
    """Upper bound of real (unpadded) tokens per micro-batch; rows are balanced by token count."""

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"actor.micro.max_tokens must be >= 1, got {self.max_tokens}")


@dataclass
class KLConfig:
    """Certainty-modulated reference KL (DESIGN.md eq. 4); ``beta0 = 0`` (the paper's runs) turns it off."""

    beta0: float = 0.0
    """Base KL weight; 0 removes the reference model entirely."""
    beta_min: float = 0.05
    """Fraction of beta0 kept for the most confident samples (c = 1)."""
    normalizer: str = DEFAULT_NORMALIZER
    """How self-certainty u maps to c in [0, 1]: a name in ``algo.CERTAINTY_NORMALIZERS``."""
    normalizer_options: Dict[str, Any] = field(default_factory=dict)
    """Constructor arguments of the normaliser."""
    offload_reference: bool = True
    """Keep the reference weights on CPU between uses (moved to the device only for its forward)."""

    def __post_init__(self) -> None:
        if not self.beta0 >= 0:
            raise ValueError(f"actor.kl.beta0 must be >= 0, got {self.beta0}")
        if not 0.0 <= self.beta_min <= 1.0:
            raise ValueError(f"actor.kl.beta_min must lie in [0, 1], got {self.beta_min}")
        if self.normalizer not in CERTAINTY_NORMALIZERS:
            raise ValueError(f"actor.kl.normalizer={self.normalizer!r} unknown; "
                             f"known: {CERTAINTY_NORMALIZERS.names()}")

    @property
    def enabled(self) -> bool:
        return self.beta0 > 0


@dataclass
class BadStepConfig:
    """Poisoned updates (NaN/inf loss or gradient norm): skipped, counted, and fatal if they persist."""

    max_consecutive: int = 3
    """Abort after this many bad steps in a row (a single one is skipped and logged)."""

    def __post_init__(self) -> None:
        if self.max_consecutive < 1:
            raise ValueError(f"actor.bad_steps.max_consecutive must be >= 1, got {self.max_consecutive}")


@dataclass
class ActorConfig:
    """The Megatron actor: model, parallelism, optimizer, micro-batching, loss, KL, bad steps."""

    model: ModelSourceConfig = field(default_factory=lambda: ModelSourceConfig(tiny=True))
    """Architecture and weights of the policy."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """TP/PP sizes and the collective backend."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    micro: MicroBatchConfig = field(default_factory=MicroBatchConfig)
    """Micro-batching."""
    loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    """Clipped surrogate (eq. 5) settings and the aggregation; Dr. GRPO's divisor is
    ``loss.token_sum_norm`` (the RL config fills ``loss.response_budget``; without it set one)."""
    kl: KLConfig = field(default_factory=KLConfig)
    """Reference KL settings."""
    bad_steps: BadStepConfig = field(default_factory=BadStepConfig)
    """Poisoned-step policy."""
    temperature: float = 1.0
    """Sampling temperature of the rollout; logits are divided by it for log-probs and certainty."""
    seed: int = 1234
    """Seed of initialisation and Megatron's RNG tracker (deterministic on CPU)."""

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"actor.temperature must be > 0, got {self.temperature}")
