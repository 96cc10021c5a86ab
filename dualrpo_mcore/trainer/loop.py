"""The DualRPO RL loop: rollout -> verify -> shape -> advantages -> update -> sync, per step.

Its pieces live in :mod:`.context` (set-up, checkpoints), :mod:`.rollouts` (rollout, verification,
the actor batch), :mod:`.batching` (rows, groups, data-parallel shares) and :mod:`.evaluation`; this
file is meant to read as the algorithm. Every rank runs :func:`train` (one process, or under torchrun /
``run_distributed``); every command that trains RL (``dualrpo train``, the demo) runs it.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Dict, List, Optional

import torch

from dualrpo_mcore.algo import group_advantages, shape_rewards

from dualrpo_mcore.actor import batching
from dualrpo_mcore.trainer import faults, preempt, probe, recovery, rollouts
from .context import Context, Hooks, broadcast, close, setup, show_config
from .evaluation import evaluate
from dualrpo_mcore.actor.reduction import reduce_metric


def generate(ctx: Context, step: int, round_: int, num_prompts: int) -> Dict[str, Any]:
    """One rollout round: G samples for each of ``num_prompts`` new prompts, verified."""
    cfg = ctx.cfg
    prompts = ctx.loader.next_prompts(num_prompts)
    params = dataclasses.replace(cfg.rollout.sampling, n=cfg.rollout.group_size,
                                 seed=rollouts.step_seed(cfg.rollout.seed, step, round_))
    with ctx.timer("rollout"):
        samples = rollouts.rollout(ctx, prompts, params)
    with ctx.timer("verify"):
        # Progress drives e.g. detection's IoU-threshold schedule.
        accuracy, statuses = rollouts.verify(ctx, prompts, samples, progress=step / cfg.schedule.steps)
    for k, n in statuses.items():
        ctx.verify_statuses[k] = ctx.verify_statuses.get(k, 0) + n
    return rollouts.make_batch(prompts, samples, accuracy, ctx.tokenizer.pad_token_id)


def shape(ctx: Context, batch: Dict[str, Any]) -> Dict[str, Any]:
    """The old policy's token statistics (u of eq. 1 among them), then the shaped rewards."""
    with ctx.timer("logprob"):
        rollouts.add_token_stats(batch, rollouts.token_stats(ctx, batch))
    r = ctx.cfg.reward
    batch["reward"] = shape_rewards(batch["accuracy"], batch["self_certainty"], r.mu, r.lam,
                                    mode=r.mode).to(torch.float32)
    return batch


def keep_informative(ctx: Context, batch: Dict[str, Any], key: str) -> Optional[Dict[str, Any]]:
    """The groups whose ``key`` varies (dynamic sampling); None if there are none."""
    g = ctx.cfg.rollout.group_size
    flat = batching.flat_groups(batch[key], g)
    groups = [i for i in range(len(flat)) if not flat[i]]
    if not groups:
        return None
    if len(groups) == len(flat):
        return batch
    return batching.select(batch, batching.group_rows(groups, g), ctx.actor.arch.image_token_id,
                           ctx.actor.arch.spatial_merge_size)


def collect(ctx: Context, step: int) -> Optional[Dict[str, Any]]:
    """The step's groups, shaped; with dynamic sampling, groups without signal are dropped and refilled
    (on 'accuracy' before the token statistics, which are then computed only for the groups kept)."""
    cfg, g, want = ctx.cfg, ctx.cfg.rollout.group_size, ctx.cfg.schedule.prompts_per_step
    dyn, on = cfg.schedule.dynamic_sampling, cfg.schedule.dynamic_sampling_on
    max_rounds = 1 + (cfg.schedule.max_refill_rounds if dyn else 0)
    kept, have, round_ = [], 0, 0
    while have < want and round_ < max_rounds:
        batch = generate(ctx, step, round_, want - have)
        if dyn and on == "accuracy":
            batch = keep_informative(ctx, batch, "accuracy")
        if batch is not None:
            batch = shape(ctx, batch)
            if dyn and on == "reward":
                batch = keep_informative(ctx, batch, "reward")
        if batch is not None:
            kept.append(batch)
            have += batch["accuracy"].numel() // g
        round_ += 1
    ctx.rounds = round_
    return batching.concat(kept) if kept else None


def train_step(ctx: Context, step: int, hooks: Hooks) -> Dict[str, float]:
    """One RL step on every rank; returns the step's metrics (identical on every rank)."""
    cfg, g = ctx.cfg, ctx.cfg.rollout.group_size
    ctx.verify_statuses = {}
    batch = collect(ctx, step)  # rollout -> verify -> token stats -> shape
    faults.at("after_rollout", step)
    if batch is None:  # dynamic sampling found no informative group: nothing to learn from
        return {"no_update": 1.0, "groups": 0.0, "rounds": float(ctx.rounds), **ctx.timer.pop()}
    batch["advantages"] = group_advantages(batch["reward"], g, eps=cfg.reward.eps,
                                           estimator=cfg.reward.estimator).to(torch.float32)
    metrics = rollouts.sample_metrics(batch)
    if cfg.schedule.overlong_filter:
        metrics["overlong_masked"] = float(rollouts.mask_overlong(batch))
    if hooks.before_update is not None:
        hooks.before_update(step, batch)
    with ctx.timer("update"):
        metrics.update(update(ctx, batch, step))
    with ctx.timer("sync"):
        rollouts.sync(ctx)
    with ctx.timer("probe"):  # the engine must now score as the trainer does, or the run stops
        metrics.update(probe.check(ctx, step))
    faults.at("after_sync", step)
    metrics.update({f"verify/{k}": float(n) for k, n in ctx.verify_statuses.items()})
    metrics.update(groups=float(batch["accuracy"].numel() // g), rounds=float(ctx.rounds), **ctx.timer.pop())
    return metrics


def update(ctx: Context, batch: Dict[str, Any], step: int = 0) -> Dict[str, float]:
    """``schedule.epochs`` passes over ``schedule.mini_batches`` group-aligned parts of the batch, one
    optimizer update each; every data-parallel rank takes its share of each part (all of its groups
    are trained on, however many ranks there are: :func:`.batching.dp_slice`)."""
    cfg, g, info = ctx.cfg, ctx.cfg.rollout.group_size, ctx.actor.info
    img, merge = ctx.actor.arch.image_token_id, ctx.actor.arch.spatial_merge_size
    outs = []
    for _ in range(cfg.schedule.epochs):
        for part in batching.mini_batches(batch, g, cfg.schedule.mini_batches, img, merge):
            # No response tokens (all overlong-masked): nothing to learn, and not poisoned either.
            if int(part["response_mask"].sum()) == 0:
                continue
            out = ctx.actor.update(batching.dp_slice(part, g, img, merge, info.dp_size, info.dp_rank))
            outs.append(dict(out, loss=ctx.actor.global_loss(out)))
            faults.at("in_update", step)
    if not outs:
        return {"no_update": 1.0}
    metrics = merge_updates(outs)
    metrics["kl"] = metrics.get("kl_mean", metrics.get("approx_kl", float("nan")))
    metrics["beta"] = metrics.get("beta_mean", 0.0)
    return metrics


def merge_updates(outs: List[Dict[str, float]]) -> Dict[str, float]:
    """One step's metrics from its updates: the guard's and the schedule's state as after the last
    update, the rest by :func:`.reduction.reduce_metric` (``skipped`` becomes the fraction skipped)."""
    last = ("lr", "bad_steps_in_a_row")
    out = {key: [o[key] for o in outs if key in o][-1] if key in last else
           reduce_metric(key, [o[key] for o in outs if key in o]) for key in outs[0]}
    out["updates"] = float(len(outs))
    return out


def train(cfg, hooks: Optional[Hooks] = None, stop_after: Optional[int] = None) -> List[Dict[str, float]]:
    """Run (or resume) the configured training; returns the metrics of the steps this call ran.

    Records before checkpoints: :func:`.recovery.commit`, docs/design.md §3.6. ``stop_after``: return
    after this step as if killed there (tests of resume). SIGTERM / SIGUSR1 (preemption, a time limit's
    warning) checkpoint the step in flight and raise :class:`.preempt.Preempted`. ``hooks.should_stop``
    (e.g. a deadline) ends the run early at a step that is then evaluated and checkpointed as the last;
    ``hooks.after_run`` runs with the live context."""
    hooks = hooks or Hooks()
    faults.arm()
    recovery.preflight(cfg)
    resolved = show_config(cfg, cfg.logging.run_dir)
    records: List[Dict[str, float]] = []
    # Before the set-up, which can take minutes: a time limit's warning during it must not kill the job.
    watch, ctx = preempt.Watch(cfg.logging.run_dir), None
    try:
        ctx = setup(cfg)
        start = last_step = recovery.resume(ctx)
        early = watch.agreed()  # signalled during the set-up: the restored checkpoint is where to go on
        if early is not None:
            raise watch.stopped(start, early)
        recovery.open_logger(ctx, resolved, start)
        rollouts.sync(ctx)  # the engine starts from the actor's (initial or restored) weights
        probe.check(ctx, start)
        if start == 0 and cfg.eval.every and cfg.eval.before_train:
            recovery.record(ctx, 0, evaluate(ctx, 0))
        for step in range(start + 1, cfg.schedule.steps + 1):
            t0 = time.time()
            metrics = train_step(ctx, step, hooks)
            # Rank 0's answer for everyone, so all ranks leave at the same step boundary.
            done = hooks.should_stop is not None and broadcast(bool(hooks.should_stop(step, time.time() - t0)))
            last = done or step == cfg.schedule.steps
            if cfg.eval.every and (step % cfg.eval.every == 0 or last):
                metrics.update(evaluate(ctx, step))
            stop = watch.agreed()  # a cluster signal on any rank: checkpoint this step, then stop
            save = bool(cfg.checkpoint.every) and (step % cfg.checkpoint.every == 0 or last) or stop is not None
            recovery.commit(ctx, step, metrics, checkpoint=save)
            records.append(dict(metrics, step=step))
            last_step = step
            if stop is not None and not last:
                raise watch.stopped(step, stop)  # leaves the marker the Slurm job script reads
            if done or (stop_after is not None and step >= stop_after):
                break
        if hooks.after_run is not None and (stop_after is None or last_step >= cfg.schedule.steps):
            hooks.after_run(ctx, last_step)
    finally:
        watch.close()
        if ctx is not None:
            close(ctx)
    return records
