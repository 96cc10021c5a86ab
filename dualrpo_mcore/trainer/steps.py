"""The pieces of the RL loop (:mod:`.loop` strings them together): set-up, rollout on rank 0 with the
results broadcast, verification, actor batches, group filtering, the update, weight sync,
checkpoint/resume and evaluation.

Process layout: every rank runs the loop; every rank draws the same prompts from its own loader
(same seed, same position), so prompts never travel. The engine and the verifier pool live on the
global rank 0; their results (plain token lists, floats, strings) are broadcast to all ranks. The
data-parallel ranks then take contiguous slices of the step's groups for the update.

Actor batches carry per-row ``[B]`` tensors next to the per-token ones (:mod:`.batching`):
``v`` (verifier reward), ``reward`` (shaped r), ``self_certainty`` (u), ``entropy`` (row mean),
``length``, ``overlong`` and ``task_id`` (index into :data:`TASK_NAMES`), so that selecting rows
(dynamic sampling, data-parallel slices) keeps everything aligned.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from dualrpo_mcore.algo import masked_mean
from dualrpo_mcore.data.schema import TASKS

from . import batching
from .metrics import HELDOUT, HELDOUT_LEVELS, PhaseTimer, per_task_means

log = logging.getLogger(__name__)
TASK_NAMES = tuple(TASKS) + ("other",)
ROW_KEYS = ("v", "reward", "self_certainty", "entropy", "length", "overlong", "task_id")


@dataclass
class Hooks:
    """Test/extension points; each is called on every rank with the same arguments."""

    before_update: Optional[Callable[[int, Dict[str, Any]], None]] = None
    """``fn(step, batch)`` may edit the update batch in place (e.g. poison it in a test)."""


@dataclass
class Context:
    """Everything one rank holds for a run."""

    cfg: Any
    actor: Any
    loader: Any
    tokenizer: Any
    exporter: Any
    manager: Any
    logger: Any
    engine: Any = None
    """The rollout engine (rank 0 only, or every rank with ``rollout.engine_on_every_rank``)."""
    pool: Any = None
    """The verifier pool (rank 0 only)."""
    heldout: List[Any] = field(default_factory=list)
    """Held-out prompts (rank 0 only, loaded once)."""
    timer: PhaseTimer = field(default_factory=PhaseTimer)
    verify_statuses: Dict[str, int] = field(default_factory=dict)
    """Verifier statuses counted over the current step's rounds."""
    rounds: int = 0
    """Rollout rounds the current step took (> 1 only with dynamic sampling refills)."""
    probe: Any = None
    """The weight-sync probe (:mod:`.probe`), None when ``rollout.probe.prompts`` is 0."""

    @property
    def rank0(self) -> bool:
        return dist.get_rank() == 0


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (plain lists/floats/strings only, via pickle over the world group)."""
    if dist.get_world_size() == 1:
        return obj
    box = [obj if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ------------------------------------------------------------------------------------ set-up
def _hf_config(cfg):
    from transformers import AutoConfig

    src = cfg.actor.model
    if src.hf_dir:
        return AutoConfig.from_pretrained(src.hf_dir)
    if src.preset:
        from transformers import Qwen2_5_VLConfig

        from dualrpo_mcore.models.qwen2_5_vl import presets

        return Qwen2_5_VLConfig(**presets.hf_config_dict(src.preset))
    if src.hf_config is None:
        raise ValueError("actor.model: the RL loop's engine needs hf_dir, a preset or a ready hf_config")
    return src.hf_config


def build_engine(cfg, tokenizer):
    """The rollout engine on rank 0; its weights come from the first sync, so a random init is fine."""
    from dualrpo_mcore.rollout.engine import build_engine as make

    opts = dict(cfg.rollout.engine_options)
    if cfg.rollout.engine == "sglang":
        # SGLang loads architecture, tokenizer and processor from a checkpoint directory itself.
        if not cfg.actor.model.hf_dir:
            raise ValueError("rollout.engine='sglang' needs actor.model.hf_dir (SGLang reads its config there)")
        # The trainer's image-processor bounds, so that both sides expand each image to the same
        # number of tokens (the engine checks the counts it sees against the trainer's prompt).
        return make("sglang", model_path=cfg.actor.model.hf_dir, image_token_id=_image_token_id(cfg),
                    bucket_bytes=cfg.rollout.bucket_mb << 20, random_seed=cfg.rollout.seed,
                    min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels, **opts)
    return make(cfg.rollout.engine, hf_config=_hf_config(cfg), tokenizer=tokenizer,
                eos_token_ids=[tokenizer.convert_tokens_to_ids(tokenizer.eos_token)], **opts)


def _image_token_id(cfg) -> int:
    from .megatron_setup import resolve_model_config

    return resolve_model_config(cfg.actor.model).image_token_id


def setup(cfg, resume_step: Optional[int] = None) -> Context:
    """Actor, loader, exporter, checkpoint manager on every rank; engine and held-out set (every rank
    with ``rollout.engine_on_every_rank``), pool on rank 0."""
    from transformers import AutoTokenizer

    from dualrpo_mcore.data import PromptLoader
    from dualrpo_mcore.rollout.sync import BucketedExporter, check_exporter_engine
    from dualrpo_mcore.verifiers.pool import VerifierPool

    from .actor import Actor
    from .checkpoint import CheckpointManager

    actor = Actor(cfg.actor)
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_dir)
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


# ------------------------------------------------------------------------------------ resume / save
def resume(ctx: Context) -> int:
    """Restore the newest checkpoint named by ``checkpoint.resume``; returns the last completed step (0 if
    fresh). Unreadable checkpoints and other configurations: see :func:`.recovery.resume`."""
    from . import recovery

    return recovery.resume(ctx)


def save(ctx: Context, step: int, poisoned: bool) -> Optional[str]:
    """Checkpoint ``step`` unless it was poisoned (its update was skipped: nothing new to keep)."""
    from . import recovery

    if poisoned:
        log.warning("step %d was poisoned (update skipped): not checkpointed", step)
        return None
    extra = {"step": step, "loader": ctx.loader.state_dict(), "actor": ctx.actor.state_dict()}
    return ctx.manager.save(step, model=ctx.actor.model, optimizer=ctx.actor.optimizer, extra_state=extra,
                            layout=recovery.layout(ctx))


# ------------------------------------------------------------------------------------ rollout / verify
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
    media = {ctx.actor.cfg.image_token_id, ctx.actor.cfg.video_token_id}
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
        statuses: Dict[str, int] = {}
        for r in results:
            statuses[r.status] = statuses.get(r.status, 0) + 1
        out = ([float(r.reward) for r in results], statuses)
    rewards, statuses = broadcast(out)
    return torch.tensor(rewards, dtype=torch.float32), statuses


# ------------------------------------------------------------------------------------ batches
def make_batch(prompts: Sequence[Any], samples: List[List[tuple]], v: torch.Tensor, pad_id: int) -> Dict[str, Any]:
    """The actor batch of all samples (rows grouped by prompt), with rollout log-probs and row fields."""
    from .sft_cli import collate

    rows, tasks, finish, roll = [], [], [], []
    for p, group in zip(prompts, samples):
        for ids, lps, reason in group:
            rows.append(dict(prompt=p.input_ids, response=torch.tensor(ids, dtype=torch.long),
                             pixel_values=p.pixel_values, image_grid_thw=p.image_grid_thw))
            tasks.append(TASK_NAMES.index(p.task) if p.task in TASK_NAMES else len(TASK_NAMES) - 1)
            finish.append(reason == "length")
            roll.append(lps)
    batch = collate(rows, pad_id)
    rl = torch.zeros(batch["input_ids"].shape, dtype=torch.float32)
    for i, (row, lps) in enumerate(zip(rows, roll)):
        start = len(row["prompt"])
        rl[i, start:start + len(lps)] = torch.tensor(lps, dtype=torch.float32)
    batch.update(rollout_logprob=rl, v=v.to(torch.float32), overlong=torch.tensor(finish, dtype=torch.bool),
                 task_id=torch.tensor(tasks, dtype=torch.long),
                 length=batch["response_mask"].sum(-1).to(torch.float32))
    return batch


def token_stats(ctx: Context, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The old policy's token statistics of the whole batch, on every rank, each data-parallel rank
    computing only its share of the groups (every rank needs all of them: shaping, dynamic sampling and
    metrics look at every group, and dynamic sampling regroups rows before the update splits them).
    Fewer groups than ranks: every rank computes everything."""
    from megatron.core import parallel_state as ps

    from .actor import STATS, with_sequence_certainty

    dp, g = ps.get_data_parallel_world_size(), ctx.cfg.rollout.group_size
    b, s = batch["input_ids"].shape
    n = b // g
    if dp == 1 or n < dp:
        return ctx.actor.compute_token_stats(batch)
    bounds = [n * r // dp for r in range(dp + 1)]
    rank = ps.get_data_parallel_rank()
    mine = select(batch, group_rows(range(bounds[rank], bounds[rank + 1]), g), ctx.actor.cfg.image_token_id,
                  ctx.actor.cfg.spatial_merge_size)
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


def select(batch: Dict[str, Any], rows: Sequence[int], image_token_id: int, merge: int) -> Dict[str, Any]:
    """Rows of ``batch`` (with their images), trimmed to their longest row."""
    return batching.select_rows(batch, list(rows), batching.image_spans(batch, image_token_id, merge))


def concat(batches: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Stack batches along rows, right-padding the token axis (pad id 0 is never attended)."""
    if len(batches) == 1:
        return batches[0]
    s = max(b["input_ids"].shape[1] for b in batches)
    out: Dict[str, Any] = {}
    for key, val in batches[0].items():
        if key in batching.IMAGE_KEYS:
            continue
        parts = [b[key] if b[key].dim() == 1 else torch.nn.functional.pad(b[key], (0, s - b[key].shape[1]))
                 for b in batches]
        out[key] = torch.cat(parts)
    imgs = [b for b in batches if b.get("image_grid_thw") is not None]
    if imgs:
        for key in batching.IMAGE_KEYS:
            out[key] = torch.cat([b[key] for b in imgs])
    return out


def flat_groups(reward: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[num_groups]`` bool: all shaped rewards of the group are equal (the advantage is 0)."""
    r = reward.view(-1, group_size)
    return (r == r[:, :1]).all(dim=1)


def group_rows(groups: Sequence[int], group_size: int) -> List[int]:
    return [g * group_size + j for g in groups for j in range(group_size)]


def mask_overlong(batch: Dict[str, Any]) -> int:
    """Clear the response mask of rows that hit ``max_new_tokens``; returns how many rows."""
    rows = batch["overlong"].bool()
    batch["response_mask"] = batch["response_mask"] * (~rows).to(batch["response_mask"].dtype)[:, None]
    return int(rows.sum())


# ------------------------------------------------------------------------------------ update
def dp_slice(batch: Dict[str, Any], group_size: int, image_token_id: int, merge: int) -> Optional[Dict[str, Any]]:
    """This data-parallel rank's contiguous share of the groups (None if there are fewer groups than
    ranks: the step then trains on nothing rather than on an uneven split)."""
    from megatron.core import parallel_state as ps

    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    n = batch["input_ids"].shape[0] // group_size
    per = n // dp
    if per == 0:
        return None
    if dp == 1 and per == n:
        return batch
    return select(batch, group_rows(range(rank * per, (rank + 1) * per), group_size), image_token_id, merge)


def mini_batches(batch: Dict[str, Any], group_size: int, k: int, image_token_id: int, merge: int):
    """``batch`` in ``k`` contiguous group-aligned parts (fewer if it has fewer groups)."""
    n = batch["input_ids"].shape[0] // group_size
    k = max(1, min(k, n))
    if k == 1:
        yield batch
        return
    for i in range(k):
        yield select(batch, group_rows(range(n * i // k, n * (i + 1) // k), group_size), image_token_id, merge)


def merge_updates(outs: Sequence[Dict[str, float]]) -> Dict[str, float]:
    """One step's metrics from its updates: extremes by min/max, the guard's and the schedule's state
    as after the last update, the rest (``skipped`` becomes the fraction skipped) averaged."""
    last = ("lr", "bad_steps_in_a_row")
    out: Dict[str, float] = {}
    for key in outs[0]:
        vals = [o[key] for o in outs if key in o]
        if key in last:
            out[key] = vals[-1]
        elif key.endswith("_max"):
            out[key] = max(vals)
        elif key.endswith("_min"):
            out[key] = min(vals)
        else:
            out[key] = sum(vals) / len(vals)
    out["updates"] = float(len(outs))
    return out


def global_loss(actor, metrics: Dict[str, float]) -> float:
    """Each data-parallel rank holds its share of the global token-mean; their sum is the loss."""
    loss = torch.tensor([metrics.get("loss", float("nan"))], dtype=torch.float64)
    if actor.info.dp_size > 1:
        from megatron.core import parallel_state as ps

        dist.all_reduce(loss, group=ps.get_data_parallel_group())
    return float(loss[0])


def sync(ctx: Context) -> None:
    """New policy weights into the engines (collective over all ranks; engines on rank 0 or on all)."""
    buckets = ctx.exporter.buckets(ctx.actor.model)
    if ctx.engine is None:
        for _ in buckets:  # the other ranks take part in the export's collectives
            pass
        return
    # The new weights are loaded before the engine re-allocates its KV cache, so the two never
    # peak together (resume_memory's contract).
    ctx.engine.resume_memory(weights=(t for bucket in buckets for t in bucket))


# ------------------------------------------------------------------------------------ metrics / eval
def sample_metrics(batch: Dict[str, Any]) -> Dict[str, float]:
    """Per-task and overall means of acc v, shaped r, u, entropy and length over the step's samples."""
    tasks = [TASK_NAMES[int(t)] for t in batch["task_id"]]
    return per_task_means(tasks, acc=batch["v"], reward=batch["reward"], certainty=batch["self_certainty"],
                          entropy=batch["entropy"], length=batch["length"])


def evaluate(ctx: Context, step: int) -> Dict[str, float]:
    """Per-task held-out accuracy (on rank 0; others return {}), greedy unless configured otherwise.
    Call it on every rank: with ``rollout.engine_on_every_rank`` each engine generates a share."""
    import dataclasses

    cfg = ctx.cfg
    if not cfg.eval.every or not cfg.eval.heldout:
        return {}
    params = dataclasses.replace(cfg.rollout.sampling, n=1, seed=cfg.rollout.seed,
                                 temperature=0.0 if cfg.eval.greedy else cfg.rollout.sampling.temperature)
    if cfg.rollout.engine_on_every_rank:
        groups = rollout(ctx, ctx.heldout, params)  # each engine a share, gathered everywhere
        if not ctx.rank0:
            return {}
    elif not ctx.rank0:
        return {}  # one engine: nothing to broadcast, only rank 0 scores
    else:
        groups = _generate(ctx, ctx.heldout, params)
    texts = [ctx.tokenizer.decode(g[0][0], skip_special_tokens=True) for g in groups]
    results = ctx.pool.verify_batch([p.reward for p in ctx.heldout], texts, progress=step / cfg.schedule.steps)
    rewards = [r.reward for r in results]
    acc = per_task_means([p.task for p in ctx.heldout], acc=rewards)
    out = {HELDOUT + k: v for k, v in acc.items()}
    out.update(by_difficulty(ctx.heldout, rewards))
    return out


def by_difficulty(prompts, rewards) -> Dict[str, float]:
    """``eval/by_difficulty/acc/<task>/d<k>`` (and its count) for the prompts that carry a difficulty.

    A task mean hides where RL helps: it tends to sharpen the easy level a policy half knows while the
    hard levels stay put, and only this split shows it."""
    keep = [i for i, p in enumerate(prompts) if p.difficulty is not None]
    if not keep:
        return {}
    split = per_task_means([f"{prompts[i].task}/d{int(prompts[i].difficulty)}" for i in keep],
                           acc=[rewards[i] for i in keep])
    return {HELDOUT_LEVELS + k: v for k, v in split.items() if not k.endswith("/all")}


def write_config(cfg, run_dir: str) -> Dict[str, Any]:
    """Print the resolved config (rank 0) and return it as a dict."""
    import json

    from .metrics import _is_rank0

    resolved = cfg.to_dict()
    if _is_rank0():  # before the process group exists: RANK from the launcher
        os.makedirs(run_dir, exist_ok=True)
        print(json.dumps(resolved, indent=2, sort_keys=True), flush=True)
    return resolved
