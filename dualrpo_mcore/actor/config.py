"""Typed configuration of the Megatron actor (the RL loop's config tree adds its own branches).

Every field has a docstring and ``__post_init__`` checks names a bad field by its dotted path.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Optional

from dualrpo_mcore.algo import CERTAINTY_NORMALIZERS, DEFAULT_NORMALIZER, PolicyLossConfig
from dualrpo_mcore.models.qwen2_5_vl.options import ModelOptions
from dualrpo_mcore.models.qwen2_5_vl.training import ModuleTraining

COMM_BACKENDS = ("nccl", "gloo")


def at_least(obj: Any, prefix: str, **minimums: float) -> None:
    """Raise ``<prefix><field> must be >= <min>, got <value>`` for the first field of ``obj`` below its
    minimum (NaN included)."""
    for name, low in minimums.items():
        value = getattr(obj, name)
        if not value >= low:
            raise ValueError(f"{prefix}{name} must be >= {low}, got {value}")


@dataclass
class ModelSourceConfig(ModelOptions):
    """The policy: where its architecture and weights come from (exactly one source), and how it is
    built (the fields of :class:`~dualrpo_mcore.models.qwen2_5_vl.options.ModelOptions`, defined there
    once: precision and FP8, ``spec_backend``, ``recompute``, ``dedup_images``, ``pad_tokens_to``,
    ``vocab_divisible_by``)."""

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
    spec_backend: str = "local"
    """Megatron layer spec: 'local' (CPU, no Transformer Engine), 'te' or 'auto' (TE with CUDA and
    TE importable); resolved once at start by :meth:`resolve_backend`. Local by default: a trainer
    config must mean the same run on every machine."""
    training: ModuleTraining = field(default_factory=ModuleTraining)
    """Per-module freezing and learning-rate multipliers (ViT, merger, LM)."""
    fused_head: bool = True
    """Actor and log-prob passes skip Megatron's output layer and feed the final hidden state and the
    output (or tied embedding) weight to ``ops.fused_head``: the [tokens, V/TP] logits and their
    gradient are never stored, only response tokens are projected. False = output layer + ``token_stats``."""
    packing: bool = True
    """Padding-free micro-batches: every forward/backward of the actor (log-probs, reference, update, SFT)
    runs a micro-batch's rows as one token stream ``[1, T]`` (T = its real tokens, padded only to the FP8
    multiple), attention kept within each row (``models.qwen2_5_vl.packing``); the results are those of
    the padded batch. Turn it off to compare against the padded ``[B, S]`` path, or where the packed
    attention is unavailable (context parallelism; a Transformer Engine build without THD attention)."""

    path: ClassVar[str] = "actor.model"

    def __post_init__(self) -> None:
        given = [n for n in ("hf_dir", "megatron_ckpt", "preset") if getattr(self, n)] + (["tiny"] if self.tiny else [])
        if len(given) != 1:
            raise ValueError(f"actor.model: give exactly one of hf_dir, megatron_ckpt, preset, tiny "
                             f"(got {given or 'none'})")
        if self.preset:
            from dualrpo_mcore.models.qwen2_5_vl import presets

            presets.hf_config_dict(self.preset)  # an unknown name fails here, listing the known ones
        super().__post_init__()
        if isinstance(self.training, dict):
            self.training = ModuleTraining(**self.training)


@dataclass
class ParallelConfig:
    """Model parallelism of the actor; data parallelism is world size / (tp * pp)."""

    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    backend: Optional[str] = None
    """Collective backend: 'nccl', 'gloo', or None (nccl with CUDA, else gloo)."""

    path: ClassVar[str] = "actor.parallel"
    """Where this section sits in its config tree (the SFT config reuses it elsewhere): errors name it."""

    def __post_init__(self) -> None:
        for name in ("tp", "pp"):
            if getattr(self, name) < 1:
                raise ValueError(f"{self.path}.{name} must be >= 1, got {getattr(self, name)}")
        if self.backend is not None and self.backend not in COMM_BACKENDS:
            raise ValueError(f"{self.path}.backend={self.backend!r}: choose one of {COMM_BACKENDS} or None")


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
    total_steps: Optional[int] = None
    """Optimizer updates the run takes (sets the warm-up and decay lengths). Derived where a run
    knows its schedule (``RLConfig.resolved_actor``: steps x mini_batches x epochs; ``SFTConfig``:
    its steps), so leave it unset there; an actor built alone (benchmarks, tests) sets it."""
    distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (Megatron's distributed optimizer)."""

    path: ClassVar[str] = "actor.optim"
    """Where this section sits in its config tree (the SFT config reuses it elsewhere): errors name it."""

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"{self.path}.lr must be > 0, got {self.lr}")
        at_least(self, f"{self.path}.", weight_decay=0)
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{self.path}.{name} must lie in [0, 1), got {getattr(self, name)}")
        if not self.adam_eps > 0:
            raise ValueError(f"{self.path}.adam_eps must be > 0, got {self.adam_eps}")
        if not self.grad_clip >= 0:
            raise ValueError(f"{self.path}.grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"{self.path}.warmup_fraction must lie in [0, 1), got {self.warmup_fraction}")
        if not 0.0 <= self.decay_fraction < 1.0:
            raise ValueError(f"{self.path}.decay_fraction must lie in [0, 1), got {self.decay_fraction}")
        if self.total_steps is not None and self.total_steps < 1:
            raise ValueError(f"{self.path}.total_steps must be >= 1 (or unset), got {self.total_steps}")


@dataclass
class MicroBatchConfig:
    """How a batch is cut into micro-batches for forward/backward."""

    max_tokens: int = 8192
    """Upper bound of real (unpadded) tokens per micro-batch; rows are balanced by token count."""

    path: ClassVar[str] = "actor.micro"
    """Where this section sits in its config tree (the SFT config reuses it elsewhere): errors name it."""

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"{self.path}.max_tokens must be >= 1, got {self.max_tokens}")


@dataclass
class KLConfig:
    """Certainty-modulated reference KL (docs/design.md eq. 4); ``beta0 = 0`` (the paper's runs) turns it off."""

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
        at_least(self, "actor.kl.", beta0=0)
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
    ``loss.token_sum_norm`` (``RLConfig.resolved_actor`` derives ``loss.response_budget``; an actor
    built alone sets it or ``loss.max_response_length``)."""
    kl: KLConfig = field(default_factory=KLConfig)
    """Reference KL settings."""
    bad_steps: BadStepConfig = field(default_factory=BadStepConfig)
    """Poisoned-step policy."""
    temperature: Optional[float] = None
    """Logits are divided by it for log-probs and certainty; it must be the rollout's sampling
    temperature, so under ``dualrpo train`` it is derived from ``rollout.sampling.temperature``
    (``RLConfig.resolved_actor``) and left unset here. An actor built alone may set it; None = 1.0."""
    seed: int = 1234
    """Seed of initialisation and Megatron's RNG tracker (deterministic on CPU)."""

    def __post_init__(self) -> None:
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError(f"actor.temperature must be > 0 (or unset), got {self.temperature}")
