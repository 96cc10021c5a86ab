"""The DualRPO RL loop: rollout -> verify -> shape -> advantages -> update -> sync, per step.

Helpers live in :mod:`.steps`; this file is meant to read as the algorithm. Every rank runs
:func:`train` (one process, or under torchrun / ``run_distributed``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional

import torch

from dualrpo_mcore.algo import group_advantages, shape_rewards

from . import steps
from .metrics import MetricsLogger


def generate(ctx: steps.Context, step: int, round_: int, num_prompts: int) -> Dict[str, Any]:
    """One rollout round: G samples for each of ``num_prompts`` new prompts, verified, scored, shaped."""
    cfg = ctx.cfg
    prompts = ctx.loader.next_prompts(num_prompts)
    params = dataclasses.replace(cfg.rollout.sampling, n=cfg.rollout.group_size,
                                 seed=steps.step_seed(cfg.rollout.seed, step, round_))
    with ctx.timer("rollout"):
        samples = steps.rollout(ctx, prompts, params)
    with ctx.timer("verify"):
        # Progress drives e.g. detection's IoU-threshold schedule.
        v, statuses = steps.verify(ctx, prompts, samples, progress=step / cfg.schedule.steps)
    batch = steps.make_batch(prompts, samples, v, ctx.tokenizer.pad_token_id)
    with ctx.timer("logprob"):
        steps.add_token_stats(batch, steps.token_stats(ctx, batch))
    r = cfg.reward
    batch["reward"] = shape_rewards(batch["v"], batch["self_certainty"], r.mu, r.lam, mode=r.mode).to(torch.float32)
    for k, n in statuses.items():
        ctx.verify_statuses[k] = ctx.verify_statuses.get(k, 0) + n
    return batch


def collect(ctx: steps.Context, step: int) -> Dict[str, Any]:
    """The step's groups; with dynamic sampling, groups without signal are dropped and refilled."""
    cfg, g, want = ctx.cfg, ctx.cfg.rollout.group_size, ctx.cfg.schedule.prompts_per_step
    img, merge = ctx.actor.cfg.image_token_id, ctx.actor.cfg.spatial_merge_size
    max_rounds = 1 + (cfg.schedule.max_refill_rounds if cfg.schedule.dynamic_sampling else 0)
    kept, have, round_ = [], 0, 0
    while have < want and round_ < max_rounds:
        batch = generate(ctx, step, round_, want - have)
        groups = list(range(batch["v"].numel() // g))
        if cfg.schedule.dynamic_sampling:
            flat = steps.flat_groups(batch[cfg.schedule.dynamic_sampling_on], g)
            groups = [i for i in groups if not flat[i]]
        if groups:
            kept.append(steps.select(batch, steps.group_rows(groups, g), img, merge))
            have += len(groups)
        round_ += 1
    ctx.rounds = round_
    return steps.concat(kept) if kept else None


def train_step(ctx: steps.Context, step: int, hooks: steps.Hooks) -> Dict[str, float]:
    """One RL step on every rank; returns the step's metrics (identical on every rank)."""
    cfg, g = ctx.cfg, ctx.cfg.rollout.group_size
    ctx.verify_statuses = {}
    batch = collect(ctx, step)  # rollout -> verify -> token stats -> shape
    if batch is None:  # dynamic sampling found no informative group: nothing to learn from
        return {"no_update": 1.0, "groups": 0.0, "rounds": float(ctx.rounds), **ctx.timer.pop()}
    batch["advantages"] = group_advantages(batch["reward"], g, eps=cfg.reward.eps,
                                           estimator=cfg.reward.estimator).to(torch.float32)
    metrics = steps.sample_metrics(batch)
    if cfg.schedule.overlong_filter:
        metrics["overlong_masked"] = float(steps.mask_overlong(batch))
    if hooks.before_update is not None:
        hooks.before_update(step, batch)
    mine = steps.dp_slice(batch, g, ctx.actor.cfg.image_token_id, ctx.actor.cfg.spatial_merge_size)
    if mine is not None and int(batch["response_mask"].sum()) > 0:
        with ctx.timer("update"):
            out = ctx.actor.update(mine)
        metrics.update(out, loss=steps.global_loss(ctx.actor, out))
        metrics["kl"] = out.get("kl_mean", out.get("approx_kl", float("nan")))
        metrics["beta"] = out.get("beta_mean", 0.0)
    else:  # every response was masked (overlong) or too few groups for the ranks: not a poisoned step
        metrics["no_update"] = 1.0
    with ctx.timer("sync"):
        steps.sync(ctx)
    metrics.update({f"verify/{k}": float(n) for k, n in ctx.verify_statuses.items()})
    metrics.update(groups=float(batch["v"].numel() // g), rounds=float(ctx.rounds), **ctx.timer.pop())
    return metrics


def train(cfg, hooks: Optional[steps.Hooks] = None, stop_after: Optional[int] = None) -> List[Dict[str, float]]:
    """Run (or resume) the configured training; returns the metrics of the steps this call ran.

    ``stop_after``: return after this step as if killed there (tests of resume)."""
    hooks = hooks or steps.Hooks()
    resolved = steps.write_config(cfg, cfg.logging.run_dir)
    ctx = steps.setup(cfg)
    records: List[Dict[str, float]] = []
    try:
        start = steps.resume(ctx)
        ctx.logger = MetricsLogger(cfg.logging.run_dir, cfg.schedule.steps, resume_step=start or None,
                                   tensorboard=cfg.logging.tensorboard, progress=cfg.logging.progress)
        ctx.logger.log_config(resolved)
        steps.sync(ctx)  # the engine starts from the actor's (initial or restored) weights
        for step in range(start + 1, cfg.schedule.steps + 1):
            metrics = train_step(ctx, step, hooks)
            last = step == cfg.schedule.steps
            if cfg.eval.every and (step % cfg.eval.every == 0 or last):
                metrics.update(steps.evaluate(ctx, step))
            if cfg.checkpoint.every and (step % cfg.checkpoint.every == 0 or last):
                steps.save(ctx, step, poisoned=metrics.get("skipped", 0.0) > 0)
            ctx.logger.log(step, metrics)
            records.append(dict(metrics, step=step))
            if stop_after is not None and step >= stop_after:
                break
    finally:
        steps.close(ctx)
    return records
