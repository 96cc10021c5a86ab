"""The weight-sync guard: after every sync, engine and trainer score the same fixed completions.

A rollout engine that silently keeps its old weights (SGLang >= 0.5.21 refuses weight updates outside
a begin/end session and says so only in a status nobody read) lets RL go on with samples from the
initial policy: rewards, advantages and losses all look plausible. The only direct evidence is that
the engine's log-probs stop following the trainer's. What is scored, the tolerance and the metrics:
docs/design.md §3.4 (the image prompt is there so the ViT's weights are covered too).

A gap near ``probe/moved`` while ``moved`` is large means the engine did not follow; a ``moved`` far
below the tolerance means the probe could not have seen a missed sync that step (tiny learning rates).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# Default tolerances (mean |engine - trainer| per token, nats). fp32: both sides compute the same
# math in fp32, measured gaps are ~1e-7 on CPU, so 1e-3 leaves room for kernel differences. Low
# precision: bf16 kernels of two different engines disagree by ~1e-2 on typical tokens.
TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2, "fp16": 5e-2}
# How far into the first source to look for a prompt with an image.
SCAN_ROWS = 256


class WeightSyncError(RuntimeError):
    """The engine does not serve the weights the trainer has."""


@dataclass
class Probe:
    batch: Dict[str, Any]
    """The actor batch of the probe rows (prompt + fixed completion)."""
    requests: List[Any]
    """The same prompts as engine requests."""
    completion: List[int]
    starts: List[int]
    """Per row, the index of the completion's first token in ``batch['input_ids']``."""
    tolerance: float
    last_trainer: Optional[torch.Tensor] = None
    """The trainer's probe log-probs at the previous check (for ``probe/moved``)."""


def default_tolerance(precision: str) -> float:
    return TOLERANCE.get(precision, max(TOLERANCE.values()))


def pick_prompts(cfg, tokenizer, k: int) -> List[Any]:
    """The first ``k`` usable prompts of the first training source in file order; if none of them
    shows an image, the last is swapped for the first one that does (within ``SCAN_ROWS``). The same
    on every rank (no shuffling, no shared loader state: the run's own draws are untouched)."""
    from dualrpo_mcore.data import PromptLoader

    data = dataclasses.replace(cfg.data, sources=[cfg.data.sources[0]], shuffle=False)
    loader = PromptLoader(data, tokenizer=tokenizer)
    rows = min(len(loader.sources[0]), SCAN_ROWS)
    prompts: List[Any] = []
    with_image = None
    for _ in range(rows):
        try:
            p = next(loader)
        except Exception as e:  # noqa: BLE001 - a source without usable rows fails later, clearly
            log.warning("probe: stopped scanning the first source: %s", e)
            break
        if len(prompts) < k:
            prompts.append(p)
        if p.image_grid_thw is not None:
            with_image = with_image or p
        if len(prompts) == k and (with_image is not None or loader.draws >= rows):
            break
    if not prompts:
        raise ValueError(f"rollout.probe: no usable prompt in {cfg.data.sources[0].path}")
    if with_image is not None and all(p.image_grid_thw is None for p in prompts):
        prompts[-1] = with_image
    return prompts


def build(ctx) -> Optional[Probe]:
    """The run's probe (None when ``rollout.probe.prompts`` is 0)."""
    from dualrpo_mcore.rollout.engine import RolloutRequest

    from .rollouts import make_batch

    pcfg = ctx.cfg.rollout.probe
    if not pcfg.prompts:
        return None
    prompts = pick_prompts(ctx.cfg, ctx.tokenizer, pcfg.prompts)
    completion = [int(t) for t in ctx.tokenizer.encode(pcfg.completion, add_special_tokens=False)]
    if not completion:
        raise ValueError(f"rollout.probe.completion={pcfg.completion!r} tokenizes to nothing")
    samples = [[(completion, [0.0] * len(completion), "stop")] for _ in prompts]
    batch = make_batch(prompts, samples, torch.zeros(len(prompts)), ctx.tokenizer.pad_token_id)
    tol = pcfg.tolerance if pcfg.tolerance is not None else default_tolerance(ctx.cfg.actor.model.precision)
    return Probe(batch=batch, requests=[RolloutRequest.from_prompt(p) for p in prompts], completion=completion,
                 starts=[len(p.input_ids) for p in prompts], tolerance=tol)


def _trainer_logprobs(ctx, probe: Probe) -> torch.Tensor:
    """``[rows, len(completion)]`` from the actor (a collective: every rank calls it)."""
    lp = ctx.actor.compute_token_stats(probe.batch, temperature=1.0)["logprob"]
    n = len(probe.completion)
    return torch.stack([lp[i, s:s + n] for i, s in enumerate(probe.starts)]).to(torch.float64)


def _engine_logprobs(ctx, probe: Probe) -> Optional[torch.Tensor]:
    if ctx.engine is None:
        return None
    scores = ctx.engine.score(probe.requests, [probe.completion] * len(probe.requests))
    for i, row in enumerate(scores):
        if len(row) != len(probe.completion):
            raise WeightSyncError(f"weight-sync probe: the engine scored {len(row)} tokens of probe row {i}, "
                                  f"expected {len(probe.completion)}")
    return torch.tensor(scores, dtype=torch.float64)


def check(ctx, step: int) -> Dict[str, float]:
    """Compare the engine's and the trainer's probe log-probs (every rank calls it; every rank raises
    the same error). Returns ``probe/gap`` and ``probe/moved``; {} when the probe is off."""
    probe = ctx.probe
    if probe is None:
        return {}
    trainer = _trainer_logprobs(ctx, probe)
    engine = _engine_logprobs(ctx, probe)
    # Every engine is checked (one per rank with engine_on_every_rank); the worst decides for all.
    local = torch.tensor([-1.0, 0.0], dtype=torch.float64)
    if engine is not None:
        local = torch.tensor([float((engine - trainer).abs().mean()), float(engine.mean())], dtype=torch.float64)
    gap, engine_mean = local.tolist()
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local)
        gap, engine_mean = max((p.tolist() for p in parts), key=lambda x: x[0])
    moved = float((trainer - probe.last_trainer).abs().mean()) if probe.last_trainer is not None else 0.0
    probe.last_trainer = trainer
    if gap > probe.tolerance:
        raise WeightSyncError(
            f"weight-sync probe after step {step}: engine and trainer disagree by {gap:.4g} nats per token "
            f"(mean |difference| over {trainer.numel()} tokens of {trainer.shape[0]} fixed prompts), above "
            f"rollout.probe.tolerance={probe.tolerance:.4g}. Engine mean log-prob {engine_mean:.6g}, trainer "
            f"{float(trainer.mean()):.6g}; the trainer's own probe moved {moved:.4g} since the last check. The "
            f"rollout engine is not serving the trainer's weights (a weight update that loaded nothing, or a "
            f"name/layout mismatch in the export).")
    return {"probe/gap": gap, "probe/moved": moved}
