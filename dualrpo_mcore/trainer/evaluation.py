"""Held-out evaluation: per-task accuracy of the current policy on a fixed prompt set.

Rank 0 also writes every evaluation to ``<run_dir>/eval/step_<k>.json`` (atomically): the aggregates
and one record per prompt (uid, task, difficulty, accuracy), so that two evaluations of the same prompts
(before and after training, or two runs) can be compared prompt by prompt, e.g. by a paired bootstrap.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Dict, List

from dualrpo_mcore.atomic import atomic_write_json

from .context import Context
from .metrics import HELDOUT, HELDOUT_LEVELS, per_task_means
from .rollouts import _generate, decode, rollout

EVAL_DIR = "eval"


def eval_path(run_dir: str, step: int) -> str:
    """Where the evaluation at ``step`` is written (step 0: the policy before any update)."""
    return os.path.join(run_dir, EVAL_DIR, f"step_{step:06d}.json")


def evaluate(ctx: Context, step: int) -> Dict[str, float]:
    """Per-task held-out accuracy (on rank 0; others return {}), greedy unless configured otherwise.
    Call it on every rank: with ``rollout.engine_on_every_rank`` each engine generates a share."""
    cfg = ctx.cfg
    if not cfg.eval.every or not cfg.eval.heldout:
        return {}
    t0 = time.time()
    params = dataclasses.replace(cfg.rollout.sampling, n=1, seed=cfg.rollout.seed,
                                 temperature=0.0 if cfg.eval.greedy else cfg.rollout.sampling.temperature)
    if cfg.rollout.engine_on_every_rank:
        groups = rollout(ctx, ctx.heldout, params)  # each engine a share, gathered everywhere
    elif ctx.rank0:
        groups = _generate(ctx, ctx.heldout, params)  # one engine: nothing to broadcast, only rank 0 scores
    if not ctx.rank0:
        return {}
    texts = [g[0] for g in decode(ctx.tokenizer, groups)]  # n=1: one response per prompt
    results = ctx.pool.verify_batch([p.reward for p in ctx.heldout], texts, progress=step / cfg.schedule.steps)
    rewards = [float(r.reward) for r in results]
    accuracy = per_task_means([p.task for p in ctx.heldout], accuracy=rewards)
    out = {HELDOUT + k: v for k, v in accuracy.items()}
    out.update(by_difficulty(ctx.heldout, rewards))
    write_eval(cfg.logging.run_dir, step, out, per_prompt(ctx.heldout, rewards), time.time() - t0)
    return out


def per_prompt(prompts, rewards) -> List[Dict[str, Any]]:
    return [dict(uid=p.uid, task=p.task, difficulty=p.difficulty, accuracy=r) for p, r in zip(prompts, rewards)]


def write_eval(run_dir: str, step: int, metrics: Dict[str, float], prompts: List[Dict[str, Any]],
               seconds: float) -> str:
    """The evaluation record of ``step`` (see the module docstring); returns its path."""
    tasks, levels = HELDOUT + "accuracy/", HELDOUT_LEVELS + "accuracy/"
    record = dict(step=step, seconds=seconds,
                  accuracy={k[len(tasks):]: v for k, v in metrics.items() if k.startswith(tasks)},
                  by_difficulty={k[len(levels):]: v for k, v in metrics.items() if k.startswith(levels)},
                  per_prompt=prompts)
    path = eval_path(run_dir, step)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_json(path, record, indent=1, sort_keys=True)
    return path


def by_difficulty(prompts, rewards) -> Dict[str, float]:
    """``eval/by_difficulty/accuracy/<task>/d<k>`` (and its count) for the prompts that carry a difficulty.

    A task mean hides where RL helps: it tends to sharpen the easy level a policy half knows while the
    hard levels stay put, and only this split shows it."""
    keep = [i for i, p in enumerate(prompts) if p.difficulty is not None]
    if not keep:
        return {}
    split = per_task_means([f"{prompts[i].task}/d{int(prompts[i].difficulty)}" for i in keep],
                           accuracy=[rewards[i] for i in keep])
    return {HELDOUT_LEVELS + k: v for k, v in split.items() if not k.endswith("/all")}
