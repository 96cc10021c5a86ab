"""Rollout, verification and the actor batch of a step, on every rank (:mod:`.loop` strings them together).

Where each part runs: docs/design.md §2.2; the actor batch's fields: §3.2 (``task_id`` indexes
:data:`TASK_NAMES`).
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Dict, List, Sequence

import torch
import torch.distributed as dist

from dualrpo_mcore.algo import masked_mean
from dualrpo_mcore.data.schema import TASKS

from dualrpo_mcore.actor import batching
from .context import Context, broadcast
from .metrics import per_task_means

TASK_NAMES = tuple(TASKS) + ("other",)


def step_seed(base: int, step: int, round_: int) -> int:
    """Sampling seed of one rollout round; the engine mixes in (prompt uid, sample index)."""
    from dualrpo_mcore.rollout.engine import seed_for

    return seed_for(base, f"step{step}", round_)


def rollout(ctx: Context, prompts: Sequence[Any], params) -> List[List[tuple]]:
    """``out[prompt][sample] = (token_ids, logprobs, finish_reason)`` on every rank."""
    if not ctx.cfg.rollout.engine_on_every_rank or dist.get_world_size() == 1:
        return broadcast(_generate(ctx, prompts, params) if ctx.rank0 else None)
    world, rank, n = dist.get_world_size(), dist.get_rank(), len(prompts)
    mine = _generate(ctx, prompts[n * rank // world: n * (rank + 1) // world], params)
    parts: List[Any] = [None] * world
    dist.all_gather_object(parts, mine)
    return [group for part in parts for group in part]


def _generate(ctx: Context, prompts: Sequence[Any], params) -> List[List[tuple]]:
    from dualrpo_mcore.rollout.engine import RolloutRequest

    if not prompts:
        return []
    # Colocated engines (SGLang) hold GPU memory only while generating: the actor's log-prob
    # forward and update that follow need it. Both calls are no-ops for the HF engine.
    ctx.engine.resume_memory()
    samples = ctx.engine.generate([RolloutRequest.from_prompt(p) for p in prompts], params)
    ctx.engine.release_memory()
    media = {ctx.actor.arch.image_token_id, ctx.actor.arch.video_token_id}
    return [[cut_at_media(list(s.token_ids), [float(x) for x in s.logprobs], s.finish_reason, media)
             for s in group] for group in samples]


def cut_at_media(ids: List[int], logprobs: List[float], finish: str, media: set) -> tuple:
    """A response that samples an image/video placeholder token ends just before it: the actor would
    read the placeholder as a slot for vision embeddings that do not exist (an early, weak policy
    does sample them). The kept prefix and its log-probs are exactly what the engine sampled."""
    for t, tok in enumerate(ids):
        if tok in media:
            return ids[:t], logprobs[:t], "stop"
    return ids, logprobs, finish


def decode(tokenizer, samples: List[List[tuple]]) -> List[List[str]]:
    return [[tokenizer.decode(s[0], skip_special_tokens=True) for s in group] for group in samples]


def verify(ctx: Context, prompts: Sequence[Any], samples: List[List[tuple]], progress: float):
    """Verifier rewards ``[num_prompts * G]`` (float32) and status counts, on every rank."""
    out = None
    if ctx.rank0:
        texts = decode(ctx.tokenizer, samples)
        specs = [p.reward for p, group in zip(prompts, texts) for _ in group]
        flat = [t for group in texts for t in group]
        results = ctx.pool.verify_batch(specs, flat, progress=progress)
        out = ([float(r.reward) for r in results], dict(Counter(r.status for r in results)))
    rewards, statuses = broadcast(out)
    return torch.tensor(rewards, dtype=torch.float32), statuses


def make_batch(prompts: Sequence[Any], samples: List[List[tuple]], accuracy: torch.Tensor,
               pad_id: int) -> Dict[str, Any]:
    """The actor batch of all samples (rows grouped by prompt), with rollout log-probs and row fields
    (``accuracy``: the verifier's reward of each sample, v of eq. 2)."""
    rows, tasks, finish, roll = [], [], [], []
    for p, group in zip(prompts, samples):
        for ids, lps, reason in group:
            rows.append(dict(prompt=p.input_ids, response=torch.tensor(ids, dtype=torch.long),
                             pixel_values=p.pixel_values, image_grid_thw=p.image_grid_thw))
            tasks.append(TASK_NAMES.index(p.task) if p.task in TASK_NAMES else len(TASK_NAMES) - 1)
            finish.append(reason == "length")
            roll.append(lps)
    batch = batching.collate(rows, pad_id)
    rl = torch.zeros(batch["input_ids"].shape, dtype=torch.float32)
    for i, (row, lps) in enumerate(zip(rows, roll)):
        start = len(row["prompt"])
        rl[i, start:start + len(lps)] = torch.tensor(lps, dtype=torch.float32)
    batch.update(rollout_logprob=rl, accuracy=accuracy.to(torch.float32),
                 overlong=torch.tensor(finish, dtype=torch.bool), task_id=torch.tensor(tasks, dtype=torch.long),
                 length=batch["response_mask"].sum(-1).to(torch.float32))
    return batch


def token_stats(ctx: Context, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The old policy's token statistics of the whole batch, on every rank, each data-parallel rank
    computing only its share of the groups (every rank needs all of them: shaping, dynamic sampling and
    metrics look at every group, and dynamic sampling regroups rows before the update splits them).
    Fewer groups than ranks: every rank computes everything."""
    from megatron.core import parallel_state as ps

    from dualrpo_mcore.actor.actor import STATS, with_sequence_certainty

    dp, g = ps.get_data_parallel_world_size(), ctx.cfg.rollout.group_size
    b, s = batch["input_ids"].shape
    n = batching.num_groups(batch, g)
    if dp == 1 or n < dp:
        return ctx.actor.compute_token_stats(batch)
    bounds = batching.dp_bounds(n, dp)
    rank = ps.get_data_parallel_rank()
    mine = batching.select(batch, batching.group_rows(range(bounds[rank], bounds[rank + 1]), g),
                           ctx.actor.arch.image_token_id, ctx.actor.arch.spatial_merge_size)
    stats = ctx.actor.compute_token_stats(mine)
    most = max(bounds[r + 1] - bounds[r] for r in range(dp)) * g
    local = torch.zeros(len(STATS), most, s, dtype=torch.float32)
    part = torch.stack([stats[k].to(torch.float32) for k in STATS])
    local[:, : part.shape[1], : part.shape[2]] = part
    parts = [torch.empty_like(local) for _ in range(dp)]
    dist.all_gather(parts, local, group=ps.get_data_parallel_group())
    full = torch.cat([p[:, : (bounds[r + 1] - bounds[r]) * g] for r, p in enumerate(parts)], dim=1)
    return with_sequence_certainty(dict(zip(STATS, full.unbind(0))), batch)


def add_token_stats(batch: Dict[str, Any], stats: Dict[str, torch.Tensor]) -> None:
    """Old-policy log-probs (per token), u and mean entropy (per row) from ``compute_token_stats``."""
    resp = batch["response_mask"].bool()
    batch.update(old_logprob=stats["logprob"], self_certainty=stats["seq_self_certainty"].to(torch.float32),
                 entropy=masked_mean(stats["entropy"], resp, dim=-1).to(torch.float32))


def mask_overlong(batch: Dict[str, Any]) -> int:
    """Clear the response mask of rows that hit ``max_new_tokens``; returns how many rows."""
    rows = batch["overlong"].bool()
    batch["response_mask"] = batch["response_mask"] * (~rows).to(batch["response_mask"].dtype)[:, None]
    return int(rows.sum())


def sync(ctx: Context) -> None:
    """New policy weights into the engines (collective over all ranks; engines on rank 0 or on all)."""
    buckets = ctx.exporter.buckets(ctx.actor.model)
    if ctx.engine is None:
        for _ in buckets:  # the other ranks take part in the export's collectives
            pass
        return
    ctx.engine.resume_memory(weights=(t for bucket in buckets for t in bucket))


def sample_metrics(batch: Dict[str, Any]) -> Dict[str, float]:
    """Per-task and overall means of accuracy, shaped reward, self-certainty, entropy and length over the
    step's samples."""
    tasks = [TASK_NAMES[int(t)] for t in batch["task_id"]]
    return per_task_means(tasks, accuracy=batch["accuracy"], reward=batch["reward"],
                          self_certainty=batch["self_certainty"], entropy=batch["entropy"], length=batch["length"])
