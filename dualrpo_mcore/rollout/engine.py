"""The rollout engine interface: sample G responses per prompt with the current policy.

Contract (engines, log-prob convention, seeds, statuses): docs/design.md §3.3. The convention is
what SGLang returns in ``output_token_logprobs`` (its sampler takes ``log`` of the temperature-scaled
softmax before the top-k/top-p filter; the unscaled variant is opt-in).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, List, Optional, Sequence, Tuple

import torch

from dualrpo_mcore.registry import Registry

FINISH_REASONS = ("stop", "length")


@dataclass
class SamplingParams:
    """How responses are sampled (one setting per ``generate`` call)."""

    path: ClassVar[str] = "rollout.sampling"
    """Where the trainer's config tree holds it: errors name the dotted path a user would ``--set``."""

    n: int = 1
    """Responses per prompt (G)."""
    temperature: float = 1.0
    """Softmax temperature; 0 = greedy."""
    top_p: float = 1.0
    """Nucleus mass kept (1 = off)."""
    top_k: int = -1
    """Keep the k most likely tokens (-1 or 0 = off)."""
    max_new_tokens: int = 128
    """Length cap; reaching it finishes with ``length``."""
    stop: Tuple[str, ...] = ()
    """Stop strings: generation ends once the decoded response contains one (finish ``stop``);
    the tokens up to and including the one completing the string are kept."""
    stop_token_ids: Tuple[int, ...] = ()
    """Extra stop tokens besides the engine's EOS ids (kept in the response)."""
    seed: Optional[int] = None
    """Base seed; sample ``j`` of request ``i`` draws from ``seed_for(seed, uid_i, j)`` where the
    engine supports it, so results do not depend on batch composition."""

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"{self.path}.n={self.n}: must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"{self.path}.temperature={self.temperature}: must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"{self.path}.top_p={self.top_p}: must be in (0, 1]")
        if self.max_new_tokens < 1:
            raise ValueError(f"{self.path}.max_new_tokens={self.max_new_tokens}: must be >= 1")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop, self.stop_token_ids = tuple(self.stop), tuple(int(t) for t in self.stop_token_ids)


@dataclass
class RolloutRequest:
    """One prompt, processed once. Images are shared by all ``n`` samples of the prompt."""

    input_ids: List[int]
    """Prompt token ids with image pads already expanded."""
    pixel_values: Optional[torch.Tensor] = None
    """Processed patches ``[patches, patch_dim]`` (HF engine)."""
    image_grid_thw: Optional[torch.Tensor] = None
    """``[num_images, 3]`` grids matching ``pixel_values``."""
    images: List[Any] = field(default_factory=list)
    """Raw images (PIL / path / base64) for engines that run their own processor (SGLang)."""
    uid: str = ""
    """Stable prompt id (seeding, logs)."""

    def __post_init__(self) -> None:
        if isinstance(self.input_ids, torch.Tensor):
            self.input_ids = [int(t) for t in self.input_ids.reshape(-1).tolist()]
        if not self.input_ids:
            raise ValueError(f"rollout request {self.uid!r}: empty input_ids")
        if (self.pixel_values is None) != (self.image_grid_thw is None):
            raise ValueError(f"rollout request {self.uid!r}: pixel_values and image_grid_thw go together")

    @classmethod
    def from_prompt(cls, prompt) -> "RolloutRequest":
        """Adapter from :class:`dualrpo_mcore.data.loader.Prompt` (needs its ``input_ids``)."""
        if prompt.input_ids is None:
            raise ValueError(f"prompt {prompt.uid!r} has no input_ids (the loader needs a tokenizer)")
        return cls(input_ids=prompt.input_ids, pixel_values=prompt.pixel_values,
                   image_grid_thw=prompt.image_grid_thw, images=list(prompt.images or []), uid=prompt.uid)


@dataclass
class Sample:
    """One sampled response."""

    token_ids: List[int]
    logprobs: List[float]
    """Per response token, see the module docstring for the convention."""
    finish_reason: str
    """``stop`` (EOS, stop token or stop string) or ``length``."""

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(f"sample has {len(self.token_ids)} tokens but {len(self.logprobs)} log-probs")
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason {self.finish_reason!r} not in {FINISH_REASONS}")


def seed_for(seed: int, uid: str, sample: int) -> int:
    """A per-(prompt, sample) seed that does not depend on the batch the prompt arrives in."""
    import hashlib

    digest = hashlib.blake2b(f"{seed}|{uid}|{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class RolloutEngine(abc.ABC):
    """Sampling backend. Lifecycle per RL step (colocated): ``resume_memory`` -> ``update_weights``
    (done inside resume for engines that need weights before KV cache) -> ``generate`` ->
    ``release_memory`` -> training."""

    retains_weights_on_release: bool = True
    """Whether weights survive ``release_memory``; if not, frozen tensors must be re-sent every
    sync (``BucketedExporter(skip_frozen=False)``)."""

    @abc.abstractmethod
    def generate(self, requests: Sequence[RolloutRequest], params: SamplingParams) -> List[List[Sample]]:
        """``params.n`` samples per request, as ``out[request][sample]``."""

    @abc.abstractmethod
    def update_weights(self, named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> int:
        """Load full HF-named tensors (any subset of the model); returns how many were loaded.
        An unknown name is an error naming it."""

    def score(self, requests: Sequence[RolloutRequest], completions: Sequence[Sequence[int]]) -> List[List[float]]:
        """Teacher-forced log-probs: for each request, ``log softmax(logits_t)[token_t]`` (T = 1) of every
        token of its fixed completion, under the engine's current weights. The weight-sync probe
        compares these with the trainer's own; an engine without it cannot be guarded."""
        raise NotImplementedError(f"{type(self).__name__} cannot score fixed completions (weight-sync probe)")

    def release_memory(self) -> None:
        """Give accelerator memory (weights, KV cache) back before training. No-op by default."""

    def resume_memory(self, weights: Optional[Iterable[Tuple[str, torch.Tensor]]] = None) -> None:
        """Take memory back before rollout; ``weights`` (if given) are loaded before the KV cache
        is re-allocated, so the two never peak together. Default: just load them."""
        if weights is not None:
            self.update_weights(weights)

    def shutdown(self) -> None:
        """Free everything; the engine is unusable afterwards."""

    def __enter__(self) -> "RolloutEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


ENGINES: Registry = Registry("rollout engine")


def build_engine(name: str, **kwargs) -> RolloutEngine:
    """Construct a registered engine (``"hf"``, ``"sglang"``)."""
    from . import hf_engine, sglang_engine  # noqa: F401 - registration side effect

    return ENGINES.get(name)(**kwargs)
