"""What one rank holds for a run (:class:`Context`), and its set-up, checkpointing and tear-down.

Process layout (prompts, engine, verifier pool, what is broadcast): docs/design.md §2.1-2.2.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

import torch.distributed as dist

from . import storage
from .metrics import PhaseTimer

if TYPE_CHECKING:  # the heavy modules load only when a run is set up
    from dualrpo_mcore.data import Prompt, PromptLoader
    from dualrpo_mcore.rollout.engine import RolloutEngine
    from dualrpo_mcore.rollout.sync import BucketedExporter
    from dualrpo_mcore.verifiers.sandbox.pool import VerifierPool

    from dualrpo_mcore.actor.actor import Actor
    from .checkpoint import CheckpointManager
    from .metrics import MetricsLogger
    from .probe import Probe
    from .rl_config import RLConfig

log = logging.getLogger(__name__)


@dataclass
class Hooks:
    """Extension points of :func:`.loop.train`; each is called on every rank with the same arguments."""

    before_update: Optional[Callable[[int, Dict[str, Any]], None]] = None
    """``fn(step, batch)`` may edit the update batch in place (e.g. poison it in a test)."""
    should_stop: Optional[Callable[[int, float], bool]] = None
    """``fn(step, seconds)`` after a step that took ``seconds``: True ends the run at this step's boundary
    (it is evaluated and checkpointed as a last step). Rank 0's answer is the one every rank follows."""
    after_run: Optional[Callable[["Context", int], None]] = None
    """``fn(ctx, last_step)`` on every rank once the steps are over, before the run is closed (a final
    evaluation, an export: anything that needs the live actor and engine)."""


@dataclass
class Context:
    """Everything one rank holds for a run."""

    cfg: "RLConfig"
    actor: "Actor"
    loader: "PromptLoader"
    tokenizer: Any
    """A transformers tokenizer (its class depends on the checkpoint)."""
    exporter: "BucketedExporter"
    manager: "CheckpointManager"
    logger: Optional["MetricsLogger"] = None
    engine: Optional["RolloutEngine"] = None
    """The rollout engine (rank 0 only, or every rank with ``rollout.engine_on_every_rank``)."""
    pool: Optional["VerifierPool"] = None
    """The verifier pool (rank 0 only)."""
    heldout: List["Prompt"] = field(default_factory=list)
    """Held-out prompts (every rank with an engine, loaded once)."""
    timer: PhaseTimer = field(default_factory=PhaseTimer)
    verify_statuses: Dict[str, int] = field(default_factory=dict)
    """Verifier statuses counted over the current step's rounds."""
    rounds: int = 0
    """Rollout rounds the current step took (> 1 only with dynamic sampling refills)."""
    probe: Optional["Probe"] = None
    """The weight-sync probe (:mod:`.probe`), None when ``rollout.probe.prompts`` is 0."""

    @property
    def rank0(self) -> bool:
        return dist.get_rank() == 0


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (plain lists/floats/strings only, via pickle over the world group);
    without a process group, ``obj`` itself."""
    if storage.dist_world() == 1:
        return obj
    box = [obj if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _hf_config(cfg):
    from dualrpo_mcore.actor.model_source import hf_config

    return hf_config(cfg.actor.model)


def build_engine(cfg, tokenizer):
    """The rollout engine on rank 0; its weights come from the first sync, so a random init is fine."""
    from dualrpo_mcore.rollout.engine import build_engine as make

    opts = dict(cfg.rollout.engine_options)
    if cfg.rollout.engine == "sglang":
        # SGLang loads architecture, tokenizer and processor from a checkpoint directory itself.
        if not cfg.actor.model.hf_dir:
            raise ValueError("rollout.engine='sglang' needs actor.model.hf_dir (SGLang reads its config there)")
        from dualrpo_mcore.actor.megatron_setup import resolve_model_config

        # The trainer's image-processor bounds, so that both sides expand each image to the same
        # number of tokens (the engine checks the counts it sees against the trainer's prompt).
        return make("sglang", model_path=cfg.actor.model.hf_dir,
                    image_token_id=resolve_model_config(cfg.actor.model).image_token_id,
                    bucket_bytes=cfg.rollout.bucket_mb << 20, random_seed=cfg.rollout.seed,
                    min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels, **opts)
    return make(cfg.rollout.engine, hf_config=_hf_config(cfg), tokenizer=tokenizer,
                eos_token_ids=[tokenizer.convert_tokens_to_ids(tokenizer.eos_token)], **opts)


def setup(cfg, resume_step: Optional[int] = None) -> Context:
    """Actor, loader, exporter, checkpoint manager on every rank; engine and held-out set (every rank
    with ``rollout.engine_on_every_rank``), pool on rank 0."""
    from transformers import AutoTokenizer

    from dualrpo_mcore.data import PromptLoader
    from dualrpo_mcore.rollout.sync import BucketedExporter, check_exporter_engine
    from dualrpo_mcore.verifiers.sandbox.pool import VerifierPool

    from dualrpo_mcore.actor.actor import Actor
    from .checkpoint import CheckpointManager

    actor = Actor(cfg.resolved_actor())  # with the values derived from the rollout and the schedule
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_path)
    loader = PromptLoader(cfg.data, tokenizer=tokenizer)
    # Every rank decides alike from the config (the engine exists on rank 0 only): an SGLang engine
    # without its host backup loses frozen tensors on release, so they are re-sent every sync.
    keeps = not (cfg.rollout.engine == "sglang" and cfg.rollout.engine_options.get("weights_cpu_backup") is False)
    exporter = BucketedExporter(cfg.rollout.bucket_mb << 20, te_spec=actor.te_spec, skip_frozen=keeps)
    ctx = Context(cfg=cfg, actor=actor, loader=loader, tokenizer=tokenizer, exporter=exporter,
                  manager=CheckpointManager(cfg.checkpoint_dir, keep_last=cfg.checkpoint.keep_last), logger=None)
    if ctx.rank0 or cfg.rollout.engine_on_every_rank:
        ctx.engine = build_engine(cfg, tokenizer)
        check_exporter_engine(exporter, ctx.engine)  # frozen tensors skipped must survive a release
    if ctx.rank0:
        ctx.pool = VerifierPool(num_workers=cfg.verifier.workers, timeout_s=cfg.verifier.timeout_s,
                                max_memory_mb=cfg.verifier.max_memory_mb)
    if cfg.eval.every and (ctx.rank0 or cfg.rollout.engine_on_every_rank):
        ctx.heldout = _heldout_prompts(cfg, tokenizer)  # every engine generates a share of it
    from . import probe

    ctx.probe = probe.build(ctx)
    return ctx


def _heldout_prompts(cfg, tokenizer) -> list:
    import dataclasses

    from dualrpo_mcore.data import PromptLoader, SourceConfig

    data = dataclasses.replace(cfg.data, sources=[SourceConfig(path=cfg.eval.heldout)], shuffle=False)
    loader = PromptLoader(data, tokenizer=tokenizer)
    n = min(cfg.eval.max_samples, len(loader.sources[0]))
    return loader.next_prompts(n)


def close(ctx: Context) -> None:
    if ctx.pool is not None:
        ctx.pool.close()
    if ctx.engine is not None:
        ctx.engine.shutdown()
    if ctx.logger is not None:
        ctx.logger.close()


def save(ctx: Context, step: int, poisoned: bool) -> Optional[str]:
    """Checkpoint ``step`` unless it was poisoned (its update was skipped: nothing new to keep)."""
    from . import recovery

    if poisoned:
        log.warning("step %d was poisoned (update skipped): not checkpointed", step)
        return None
    extra = {"step": step, "loader": ctx.loader.state_dict(), "actor": ctx.actor.state_dict()}
    return ctx.manager.save(step, model=ctx.actor.model, optimizer=ctx.actor.optimizer, extra_state=extra,
                            layout=recovery.layout(ctx))


def show_config(cfg, run_dir: str) -> Dict[str, Any]:
    """The resolved config as a dict, printed by rank 0 (which also creates the run dir); the logger
    writes it to the run dir."""
    import json

    from dualrpo_mcore.parallel import global_rank

    resolved = cfg.to_dict()
    if global_rank() == 0:  # before the process group exists: RANK from the launcher
        os.makedirs(run_dir, exist_ok=True)
        print(json.dumps(resolved, indent=2, sort_keys=True), flush=True)
    return resolved
