"""Root configuration of the RL loop (``dualrpo train``): a tree of typed dataclasses.

The actor's branch is :class:`~.config.ActorConfig` and the data branch :class:`DataConfig`; this
module adds the others. Conventions (docstrings, checks, derived fields, recipes): docs/design.md §3.7.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from dualrpo_mcore.algo import ADVANTAGE_ESTIMATORS, REWARD_MODES
from dualrpo_mcore.data import DataConfig
from dualrpo_mcore.rollout.engine import SamplingParams

from dualrpo_mcore.actor.config import ActorConfig, at_least


@dataclass
class ProbeConfig:
    """The weight-sync guard: after every sync the engine scores fixed completions of a few fixed
    prompts, and its log-probs must match the trainer's. A sync that silently loads nothing (the
    engine keeps serving old weights while RL goes on) is caught at the first step."""

    prompts: int = 3
    """Probe prompts, drawn in file order from the first training source; at least one shows an
    image when the source has any. 0 turns the guard off."""
    completion: str = " <answer>1</answer>"
    """The fixed completion every probe prompt is scored on (tokenized once)."""
    tolerance: Optional[float] = None
    """Largest allowed mean |engine - trainer| log-prob gap per completion token; above it the run
    stops. None: 1e-3 for fp32 policies (the two forward the same math), 5e-2 for bf16/fp16/FP8
    (different kernels round differently)."""

    def __post_init__(self) -> None:
        at_least(self, "rollout.probe.", prompts=0)
        if self.tolerance is not None and not self.tolerance > 0:
            raise ValueError(f"rollout.probe.tolerance must be > 0 or None, got {self.tolerance}")
        if self.prompts and not self.completion:
            raise ValueError("rollout.probe.completion must not be empty while rollout.probe.prompts > 0")


@dataclass
class RolloutConfig:
    """How the G responses per prompt are sampled and how weights reach the engine."""

    engine: str = "hf"
    """Rollout engine, a name in ``rollout.engine.ENGINES`` ('hf' on CPU, 'sglang' on GPUs)."""
    group_size: int = 4
    """G: responses sampled per prompt (the group of the advantage)."""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    """Temperature, top-p/k, max_new_tokens; ``n`` is set to ``group_size`` and ``seed`` per step by the loop."""
    bucket_mb: int = 512
    """Weight-sync bucket size in MiB (bounds the extra memory of a sync)."""
    engine_options: Dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments of the engine, e.g. SGLang's ``mem_fraction_static`` (share of GPU
    memory its weights + KV cache may take) and ``tp_size``."""
    seed: int = 0
    """Base of the per-(step, prompt, sample) sampling seeds: a resumed run samples the same tokens."""
    engine_on_every_rank: bool = False
    """Every rank runs its own engine replica (each holds the whole policy) and generates a contiguous
    share of each round's prompts, whatever the actor's TP/PP; False: one engine on global rank 0
    while the other ranks wait. The draws are the same either way (seeded per prompt and sample).
    HF engine only: SGLang replicas would each need their own GPU memory share."""
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    """The weight-sync guard (fixed prompts scored by engine and trainer after every sync)."""

    def __post_init__(self) -> None:
        if self.engine_on_every_rank and self.engine != "hf":
            raise ValueError(f"rollout.engine_on_every_rank needs rollout.engine='hf', got {self.engine!r}")
        if isinstance(self.sampling, dict):
            self.sampling = SamplingParams(**self.sampling)
        if isinstance(self.probe, dict):
            self.probe = ProbeConfig(**self.probe)
        if self.group_size < 2:
            raise ValueError(f"rollout.group_size must be >= 2 (a group advantage needs peers), got {self.group_size}")
        at_least(self, "rollout.", bucket_mb=1)
        if self.sampling.temperature == 0:
            raise ValueError("rollout.sampling.temperature must be > 0 for training (greedy is for eval)")


@dataclass
class RewardConfig:
    """Reward shaping (docs/design.md eq. 2) and the group advantage (eq. 3)."""

    mode: str = "dualrpo"
    """A name in ``algo.REWARD_MODES``: 'grpo' (v), 'dualrpo' (eq. 2), 'internal' (u only)."""
    mu: float = 0.01
    """Certainty bonus on correct answers (eq. 2)."""
    lam: float = 0.005
    """Certainty penalty on wrong answers (eq. 2)."""
    estimator: str = "grpo"
    """Group advantage estimator, a name in ``algo.ADVANTAGE_ESTIMATORS``."""
    eps: float = 1e-6
    """Added to the group std of the 'grpo' estimator."""

    def __post_init__(self) -> None:
        if self.mode not in REWARD_MODES:
            raise ValueError(f"reward.mode={self.mode!r}: choose one of {REWARD_MODES.names()}")
        if self.estimator not in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"reward.estimator={self.estimator!r}: choose one of {ADVANTAGE_ESTIMATORS.names()}")
        at_least(self, "reward.", eps=0)


@dataclass
class VerifierConfig:
    """The sandboxed verifier pool (rank 0)."""

    workers: int = 2
    """Samples scored concurrently (one process each)."""
    timeout_s: float = 5.0
    """Per-sample budget; a sample past it scores 0 with status 'timeout'."""
    max_memory_mb: int = 2048
    """Address-space limit of a worker (0 = off)."""

    def __post_init__(self) -> None:
        at_least(self, "verifier.", workers=1, max_memory_mb=0)
        if not self.timeout_s > 0:
            raise ValueError(f"verifier.timeout_s must be > 0, got {self.timeout_s}")


@dataclass
class ScheduleConfig:
    """Length of the run and what enters each step's batch."""

    steps: int = 100
    """RL steps: one rollout batch each, ``mini_batches * epochs`` optimizer updates on it."""
    prompts_per_step: int = 8
    """Prompts (groups) per step, over all data-parallel ranks."""
    dynamic_sampling: bool = False
    """Drop groups without signal (see ``dynamic_sampling_on``) and refill with new prompts."""
    dynamic_sampling_on: str = "accuracy"
    """What must vary inside a group for it to be kept: 'accuracy' (the verifier's reward, v of eq. 2:
    all right or all wrong groups are dropped, as in DAPO) or 'reward' (the shaped reward; 'internal'
    mode needs it). Why 'accuracy' under 'dualrpo': docs/design.md, eq. 3."""
    max_refill_rounds: int = 2
    """Extra rollout rounds dynamic sampling may spend per step; a short batch then trains as is."""
    mini_batches: int = 1
    """Optimizer updates per pass over a step's batch: its groups split into this many contiguous
    parts (PPO-style reuse of rollouts; the clip of eq. 5 bounds how far the policy goes)."""
    epochs: int = 1
    """Passes over the mini-batches per step."""
    overlong_filter: bool = False
    """Leave responses that hit ``max_new_tokens`` out of the loss (truncated answers are not wrong)."""

    def __post_init__(self) -> None:
        at_least(self, "schedule.", steps=1, prompts_per_step=1, mini_batches=1, epochs=1, max_refill_rounds=0)
        if self.dynamic_sampling_on == "v":
            raise ValueError("schedule.dynamic_sampling_on='v': the value 'v' was renamed to 'accuracy' "
                             "(the verifier's reward); set schedule.dynamic_sampling_on='accuracy'")
        if self.dynamic_sampling_on not in ("accuracy", "reward"):
            raise ValueError(f"schedule.dynamic_sampling_on={self.dynamic_sampling_on!r}: "
                             "choose 'accuracy' or 'reward'")


@dataclass
class CheckpointConfig:
    """Atomic checkpoints (model, optimizer, RNG, loader position, actor state, step)."""

    dir: Optional[str] = None
    """Checkpoint root; None = ``<run_dir>/checkpoints``."""
    every: int = 50
    """Save every this many steps (and at the last step); 0 = never."""
    keep_last: int = 3
    """Complete checkpoints kept."""
    resume: Optional[str] = None
    """None = fresh start; 'auto' = newest complete checkpoint under ``dir`` if any; or a path."""

    def __post_init__(self) -> None:
        at_least(self, "checkpoint.", every=0, keep_last=1)


@dataclass
class EvalConfig:
    """Held-out evaluation (greedy by default), per-task accuracy under ``eval/accuracy/<task>``, and per task
    and difficulty under ``eval/by_difficulty/accuracy/<task>/d<k>`` for rows that carry one."""

    every: int = 0
    """Evaluate every this many steps (and after the last step); 0 = never."""
    heldout: Optional[str] = None
    """Held-out parquet/jsonl file; required when ``every`` > 0."""
    greedy: bool = True
    """Greedy decoding (temperature 0); False samples at the rollout temperature with a fixed seed."""
    max_samples: int = 64
    """Held-out prompts evaluated (the first ones in file order)."""
    before_train: bool = True
    """Also evaluate the starting policy, logged as step 0 of a fresh run, so the held-out curves start
    where training did (a resumed run has that record already)."""

    def __post_init__(self) -> None:
        at_least(self, "eval.", every=0, max_samples=1)
        if self.every > 0 and not self.heldout:
            raise ValueError("eval.heldout must name a file when eval.every > 0")


WANDB_MODES = ("disabled", "offline", "online")


@dataclass
class WandbConfig:
    """Weights & Biases beside TensorBoard: the same metric names at the same steps as metrics.jsonl,
    and the resolved config once. Off unless ``mode`` says otherwise; needs the ``wandb`` extra."""

    mode: str = "disabled"
    """'disabled' (no W&B at all), 'offline' (a local run directory, uploaded later with
    ``wandb sync``) or 'online'."""
    project: str = "dualrpo"
    """W&B project."""
    entity: Optional[str] = None
    """W&B team or user; None: the account's default entity."""
    name: Optional[str] = None
    """Display name of the run; None: the run directory's base name."""
    tags: List[str] = field(default_factory=list)
    """Tags on the run (each 1 to 64 characters, W&B's limit)."""
    dir: Optional[str] = None
    """Where W&B keeps its local files (``<dir>/wandb/``); None: the run directory."""

    def __post_init__(self) -> None:
        if self.mode not in WANDB_MODES:
            raise ValueError(f"logging.wandb.mode must be one of {', '.join(WANDB_MODES)}, got {self.mode!r}")
        if not isinstance(self.project, str) or not self.project.strip():
            raise ValueError(f"logging.wandb.project must be a non-empty string, got {self.project!r}")
        if self.name is not None and not str(self.name).strip():
            raise ValueError("logging.wandb.name must be None or a non-empty string")
        if isinstance(self.tags, str) or not all(isinstance(t, str) and 0 < len(t) <= 64 for t in self.tags):
            raise ValueError(f"logging.wandb.tags must be a list of strings of 1 to 64 characters, got {self.tags!r}")


@dataclass
class LoggingConfig:
    """Where the run writes config.json, metrics.jsonl and TensorBoard events, and which other sinks
    mirror them."""

    run_dir: str = "runs/dualrpo"
    """Run directory."""
    tensorboard: bool = True
    """Write TensorBoard events next to the JSONL."""
    progress: bool = True
    """Show a progress bar (rank 0)."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases (off by default)."""

    def __post_init__(self) -> None:
        if isinstance(self.wandb, dict):  # a config read back from config.json
            self.wandb = WandbConfig(**self.wandb)


@dataclass
class RLConfig:
    """The whole ``dualrpo train`` run."""

    actor: ActorConfig = field(default_factory=ActorConfig)
    """The Megatron actor (model source, TP/PP, optimizer, loss, KL weight beta0/beta_min/normaliser)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training prompts."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Sampling and weight sync."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Reward mode, mu, lam, advantage estimator."""
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    """Verifier pool."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Steps, prompts per step, dynamic sampling, overlong filtering."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing and resume."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Run directory and sinks."""
    tokenizer_dir: Optional[str] = None
    """Tokenizer + processor directory (decoding responses, the engine); None = ``data.processor_dir``
    (read it through :attr:`tokenizer_path`)."""

    def __post_init__(self) -> None:
        # Checks only: a derived value is computed where it is read (resolved_actor, tokenizer_path),
        # never written back, so an override of its source cannot leave a stale copy behind.
        if not self.data.sources:
            raise ValueError("data.sources is empty: name at least one training file")
        for path, given, derived, source in self._derived():
            if given is not None and given != derived:
                raise ValueError(f"{path}={given} conflicts with {source}={derived}: {path} is derived from "
                                 f"{source}; leave {path} unset and set {source}")
        if (self.schedule.dynamic_sampling and self.reward.mode == "internal"
                and self.schedule.dynamic_sampling_on == "accuracy"):
            raise ValueError("schedule.dynamic_sampling_on='accuracy' with reward.mode='internal' would drop every "
                             "group the verifier scores alike; use 'reward'")
        if not self.tokenizer_path:
            raise ValueError("tokenizer_dir (or data.processor_dir) must name the tokenizer directory")

    def _derived(self):
        """``(path, stored value, derived value, source path)`` of each actor field the run derives
        (why each is derived: docs/design.md §3.7)."""
        return [
            ("actor.temperature", self.actor.temperature, self.rollout.sampling.temperature,
             "rollout.sampling.temperature"),
            ("actor.optim.total_steps", self.actor.optim.total_steps, self.optimizer_updates,
             "schedule.steps x schedule.mini_batches x schedule.epochs"),
            ("actor.loss.response_budget", self.actor.loss.response_budget, self.rollout.sampling.max_new_tokens,
             "rollout.sampling.max_new_tokens"),
        ]

    @property
    def optimizer_updates(self) -> int:
        """Optimizer updates of the whole run: ``mini_batches * epochs`` per step."""
        return self.schedule.steps * self.schedule.mini_batches * self.schedule.epochs

    @property
    def tokenizer_path(self) -> Optional[str]:
        """The tokenizer + processor directory: ``tokenizer_dir``, else ``data.processor_dir``."""
        return self.tokenizer_dir or self.data.processor_dir

    def resolved_actor(self) -> ActorConfig:
        """The actor's config as the run uses it: ``actor`` with the values derived from the other branches
        (temperature, ``optim.total_steps``, ``loss.response_budget``) filled in. A new tree; ``actor``
        itself keeps them unset, so one stored value decides each."""
        a = self.actor
        return dataclasses.replace(
            a, temperature=self.rollout.sampling.temperature,
            optim=dataclasses.replace(a.optim, total_steps=self.optimizer_updates),
            loss=dataclasses.replace(a.loss, response_budget=self.rollout.sampling.max_new_tokens))

    @property
    def checkpoint_dir(self) -> str:
        import os

        return self.checkpoint.dir or os.path.join(self.logging.run_dir, "checkpoints")

    def to_dict(self) -> Dict[str, Any]:
        """The resolved config as a plain nested dict (config.json): derived values filled in (the
        actor's as :meth:`resolved_actor` gives them, ``tokenizer_dir``), non-JSON leaves (e.g. a ready HF
        config object) as strings, and ``reward_mode`` at the top for ``dualrpo plot``. Building an
        RLConfig from it again gives the same run (a derived value equal to its source is accepted)."""
        resolved = dataclasses.replace(self, actor=self.resolved_actor(), tokenizer_dir=self.tokenizer_path)
        out = json.loads(json.dumps(dataclasses.asdict(resolved), default=_jsonable))
        out["reward_mode"] = self.reward.mode
        return out


def _jsonable(obj: Any) -> Any:
    to_dict = getattr(obj, "to_dict", None)
    return to_dict() if callable(to_dict) else str(obj)
