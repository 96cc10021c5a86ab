"""``dualrpo sft``: a short supervised warm start on the Megatron actor.

Cross-entropy on the ``solution`` column of a prompt set (the synthetic set of ``dualrpo data synth``
has one per row), on the same :class:`~.actor.Actor` the RL loop trains, so TP/PP, micro-batching,
the optimizer and the schedule are the RL ones. The demo uses it to turn a random tiny Qwen2.5-VL
into a base policy that is right sometimes. The result is a Hugging Face directory (weights, config,
tokenizer and processor files) that the rollout engine and ``dualrpo train`` load.

Runs as one process (TP=1) or under ``torchrun`` (``--tp``/``--pp``; the rest is data parallel).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import Any, Dict, List

import torch

from dualrpo_mcore.actor import batching

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "preprocessor_config.json", "dualrpo_tokens.json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--set KEY=VALUE`` on :class:`~.sft_config.SFTConfig`, and its flags, each an alias of one entry."""
    from dualrpo_mcore.trainer.overrides import add_alias, add_set_argument
    from dualrpo_mcore.commands.sft_config import FLAGS

    add_set_argument(parser, "optim.adam_beta2=0.99 or micro.max_tokens=2048")
    for flag, (path, help) in FLAGS.items():
        add_alias(parser, flag, path, help, metavar=path.rpartition(".")[2].upper())
    add_alias(parser, "--no-progress", "progress", "no progress bar", value="false")
    add_alias(parser, "--no-packing", "packing", "padded [B, S] micro-batches instead of packed streams",
              value="false")


def config_from_args(args):
    """The :class:`~.sft_config.SFTConfig` of the command line (defaults, then its entries in order)."""
    from dualrpo_mcore.trainer.overrides import apply_overrides
    from dualrpo_mcore.commands.sft_config import SFTConfig

    return apply_overrides(SFTConfig, getattr(args, "overrides", []))


def sft_rows(prompts, tokenizer) -> List[Dict[str, Any]]:
    """Prompt ids + the solution followed by the end-of-turn token (the policy must learn to stop)."""
    rows = []
    for p in prompts:
        if not p.solution:
            raise ValueError(f"{p.file} row {p.row}: no 'solution' to train on")
        answer = tokenizer(p.solution + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        rows.append(dict(prompt=p.input_ids, response=torch.tensor(answer, dtype=torch.long),
                         pixel_values=p.pixel_values, image_grid_thw=p.image_grid_thw))
    return rows


def _initial_model(cfg, model_dir):
    """(HF config, HF state dict) of the starting point: ``init``, or a fresh seeded tiny model."""
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    if cfg.init:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(cfg.init, dtype=torch.float32)
        return AutoConfig.from_pretrained(cfg.init), model.state_dict()
    t = cfg.tiny
    from dualrpo_mcore.models.qwen2_5_vl.presets import for_tokenizer

    hf = for_tokenizer(model_dir, t.hidden_size, t.layers, t.vision_depth, t.vision_hidden)
    torch.manual_seed(cfg.seed)
    return hf, Qwen2_5_VLForConditionalGeneration(hf).float().state_dict()


def save_hf(actor, hf_config, out_dir: str, model_dir: str) -> None:
    """Gather the trained weights (TP inside ``export_hf``, PP here) and write a HF dir atomically on rank 0."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from transformers import Qwen2_5_VLForConditionalGeneration

    tensors = {k: v.detach().cpu().clone() for k, v in actor.export_hf()}
    if actor.info.pp_size > 1:
        parts: List[Any] = [None] * actor.info.pp_size
        dist.all_gather_object(parts, tensors, group=ps.get_pipeline_model_parallel_group())
        tensors = {k: v for part in parts for k, v in part.items()}
    if dist.get_rank() != 0:
        dist.barrier()
        return
    model = Qwen2_5_VLForConditionalGeneration(hf_config).float()
    from dualrpo_mcore.models.qwen2_5_vl import mapping

    own = {mapping.normalize_hf_name(k): k for k in model.state_dict()}
    missing = sorted(set(own) - set(tensors))
    if missing:
        raise RuntimeError(f"export is missing {missing[:5]}")
    model.load_state_dict({own[k]: v for k, v in tensors.items()}, strict=True)
    from dualrpo_mcore.atomic import atomic_dir

    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        for fname in TOKENIZER_FILES:
            if os.path.exists(os.path.join(model_dir, fname)):
                shutil.copy2(os.path.join(model_dir, fname), os.path.join(tmp, fname))
    dist.barrier()


def train(cfg) -> Dict[str, Any]:
    """The SFT loop of an :class:`~.sft_config.SFTConfig`; returns ``{"losses": [...], "lrs": [...], "out": dir, "actor": the trained actor,
    "loader", "tokenizer"}`` on every rank (losses are global, identical everywhere)."""
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from dualrpo_mcore.actor.actor import Actor
    from dualrpo_mcore.data import PromptLoader
    from dualrpo_mcore.trainer.recipes import synth_data_config

    model_dir = os.path.join(cfg.data, "model")
    hf_config, hf_sd = _initial_model(cfg, model_dir)
    actor = Actor(cfg.actor_config(hf_config), hf_state_dict=hf_sd)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    loader = PromptLoader(synth_data_config(cfg.data, cfg.train_file, cfg.seed), tokenizer=tokenizer)
    dp, dp_rank = actor.info.dp_size, actor.info.dp_rank
    losses: List[float] = []
    lrs: List[float] = []
    bar = tqdm(total=cfg.steps, desc="sft", unit="step", file=sys.stderr,
               disable=not (cfg.progress and torch.distributed.get_rank() == 0))
    for _ in range(cfg.steps):
        prompts = loader.next_prompts(cfg.batch_size * dp)[dp_rank::dp]  # same draws on every rank
        metrics = actor.sft_step(batching.collate(sft_rows(prompts, tokenizer), tokenizer.pad_token_id))
        loss = actor.global_loss(metrics)
        losses.append(loss)
        lrs.append(float(metrics["lr"]))
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{metrics['lr']:.2e}", skipped=int(metrics["skipped"]))
    bar.close()
    save_hf(actor, hf_config, cfg.out, model_dir)
    return dict(losses=losses, lrs=lrs, out=cfg.out, actor=actor, loader=loader, tokenizer=tokenizer)


def run(args) -> int:
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        print(f"dualrpo sft: {e}", file=sys.stderr)
        return 2
    if os.path.exists(cfg.out):
        print(f"dualrpo sft: out={cfg.out} already exists; choose a new --out", file=sys.stderr)
        return 2
    result = train(cfg)
    import torch.distributed as dist

    from dualrpo_mcore.parallel import shutdown

    if dist.get_rank() == 0:
        first, last = result["losses"][0], result["losses"][-1]
        print(f"sft: {len(result['losses'])} steps, loss {first:.4f} -> {last:.4f}; wrote {result['out']}")
    shutdown()
    return 0
