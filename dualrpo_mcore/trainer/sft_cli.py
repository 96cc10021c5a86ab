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
import json
import logging
import os
import shutil
import sys
import tempfile
from typing import Any, Dict, List

import torch

log = logging.getLogger(__name__)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "preprocessor_config.json", "dualrpo_tokens.json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="directory of `dualrpo data synth` (train.parquet + model/)")
    parser.add_argument("--out", required=True, help="output Hugging Face directory (must not exist)")
    parser.add_argument("--train-file", default="train.parquet", help="file under --data to train on")
    parser.add_argument("--init", default=None, help="start from this HF directory instead of a fresh tiny model")
    parser.add_argument("--steps", type=int, default=60, help="optimizer updates")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per update per data-parallel rank")
    parser.add_argument("--lr", type=float, default=2e-3,
                        help="peak learning rate (warm-up 5%%, constant, then --decay-fraction linear decay)")
    # 0.1: ending at the constant peak leaves the warm start at a noisy point (see trainer/schedule.py).
    parser.add_argument("--decay-fraction", type=float, default=0.1,
                        help="last fraction of the updates over which the rate falls linearly towards 0")
    parser.add_argument("--max-tokens", type=int, default=4096, help="tokens per micro-batch")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden-size", type=int, default=64, help="tiny model: LM hidden size")
    parser.add_argument("--layers", type=int, default=2, help="tiny model: LM layers")
    parser.add_argument("--vision-depth", type=int, default=2, help="tiny model: ViT blocks")
    parser.add_argument("--vision-hidden", type=int, default=32, help="tiny model: ViT width (heads of 16 dims)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def tiny_config_for_tokenizer(model_dir: str, hidden_size: int = 64, layers: int = 2, vision_depth: int = 2,
                              vision_hidden: int = 32):
    """A small ``Qwen2_5_VLConfig`` whose vocabulary, special ids and patch geometry match the
    tokenizer/processor in ``model_dir`` (``dualrpo_tokens.json``, ``preprocessor_config.json``)."""
    from transformers import Qwen2_5_VLConfig

    with open(os.path.join(model_dir, "dualrpo_tokens.json")) as f:
        facts = json.load(f)
    with open(os.path.join(model_dir, "preprocessor_config.json")) as f:
        proc = json.load(f)
    heads = 4
    if hidden_size % (heads * 4):
        raise ValueError(f"--hidden-size {hidden_size} must be a multiple of {heads * 4} (4 heads, mrope sections)")
    half = hidden_size // heads // 2  # rotary half-dim, split over (t, h, w)
    section = [half - 2 * (half // 3), half // 3, half // 3]
    text = dict(vocab_size=facts["vocab_size"], hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=2, rms_norm_eps=1e-6,
                max_position_embeddings=4096, bos_token_id=facts["bos_token_id"], eos_token_id=facts["eos_token_id"],
                pad_token_id=facts["pad_token_id"],
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section})
    patch, merge = int(proc["patch_size"]), int(proc["merge_size"])
    if vision_hidden % 16:
        raise ValueError(f"--vision-hidden {vision_hidden} must be a multiple of 16 (heads of 16 dims)")
    vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                  num_heads=vision_hidden // 16, patch_size=patch,
                  temporal_patch_size=int(proc["temporal_patch_size"]), in_channels=3, spatial_merge_size=merge,
                  window_size=patch * merge * 2, fullatt_block_indexes=[vision_depth - 1], out_hidden_size=hidden_size)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=facts["image_token_id"],
                            video_token_id=facts["video_token_id"], vision_start_token_id=facts["vision_start_token_id"],
                            vision_end_token_id=facts["vision_end_token_id"], tie_word_embeddings=False)


def collate(rows: List[Dict[str, Any]], pad_id: int) -> Dict[str, Any]:
    """Right-padded actor batch from ``{"prompt": ids, "response": ids, pixel_values, image_grid_thw}``.

    Padded to its longest row only: the actor cuts it into micro-batches trimmed to their own rows,
    and pads each of those for FP8 (``microbatch.pad_tokens``), so a multiple set here would not survive."""
    seqs = [torch.cat([r["prompt"], r["response"]]) for r in rows]
    s = max(len(x) for x in seqs)
    b = len(rows)
    ids = torch.full((b, s), pad_id, dtype=torch.long)
    attn = torch.zeros(b, s, dtype=torch.long)
    resp = torch.zeros(b, s, dtype=torch.long)
    for i, (r, x) in enumerate(zip(rows, seqs)):
        ids[i, : len(x)] = x
        attn[i, : len(x)] = 1
        resp[i, len(r["prompt"]): len(x)] = 1
    batch: Dict[str, Any] = dict(input_ids=ids, attention_mask=attn, response_mask=resp)
    imgs = [r for r in rows if r.get("image_grid_thw") is not None]
    if imgs:
        batch["pixel_values"] = torch.cat([r["pixel_values"] for r in imgs])
        batch["image_grid_thw"] = torch.cat([r["image_grid_thw"] for r in imgs])
    return batch


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


def _actor(args, hf_config, hf_state_dict):
    from .actor import Actor
    from .config import ActorConfig, MicroBatchConfig, ModelSourceConfig, OptimConfig, ParallelConfig

    cfg = ActorConfig(model=ModelSourceConfig(tiny=True, hf_config=hf_config),
                      parallel=ParallelConfig(tp=args.tp, pp=args.pp),
                      optim=OptimConfig(lr=args.lr, total_steps=args.steps, grad_clip=1.0,
                                        decay_fraction=args.decay_fraction),
                      micro=MicroBatchConfig(max_tokens=args.max_tokens), seed=args.seed)
    return Actor(cfg, hf_state_dict=hf_state_dict)


def _initial_model(args, model_dir):
    """(HF config, HF state dict) of the starting point: --init, or a fresh seeded tiny model."""
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    if args.init:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.init, dtype=torch.float32)
        return AutoConfig.from_pretrained(args.init), model.state_dict()
    cfg = tiny_config_for_tokenizer(model_dir, args.hidden_size, args.layers, args.vision_depth, args.vision_hidden)
    torch.manual_seed(args.seed)
    return cfg, Qwen2_5_VLForConditionalGeneration(cfg).float().state_dict()


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
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-sft-", dir=parent)
    try:
        model.save_pretrained(tmp)
        for fname in TOKENIZER_FILES:
            if os.path.exists(os.path.join(model_dir, fname)):
                shutil.copy2(os.path.join(model_dir, fname), os.path.join(tmp, fname))
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist.barrier()


def train(args) -> Dict[str, Any]:
    """The SFT loop; returns ``{"losses": [...], "lrs": [...], "out": dir, "actor": the trained actor,
    "loader", "tokenizer"}`` on every rank (losses are global, identical everywhere)."""
    from transformers import AutoTokenizer

    from dualrpo_mcore.data import DataConfig, PromptLoader, SourceConfig

    model_dir = os.path.join(args.data, "model")
    hf_config, hf_sd = _initial_model(args, model_dir)
    actor = _actor(args, hf_config, hf_sd)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with open(os.path.join(model_dir, "preprocessor_config.json")) as f:
        size = json.load(f)["size"]
    loader = PromptLoader(DataConfig(sources=[SourceConfig(path=os.path.join(args.data, args.train_file))],
                                     seed=args.seed, processor_dir=model_dir, min_pixels=size["shortest_edge"],
                                     max_pixels=size["longest_edge"]), tokenizer=tokenizer)
    dp, dp_rank = actor.info.dp_size, actor.info.dp_rank
    show = not args.no_progress and torch.distributed.get_rank() == 0
    losses: List[float] = []
    lrs: List[float] = []
    bar = _progress(args.steps, show)
    for _ in range(args.steps):
        prompts = loader.next_prompts(args.batch_size * dp)[dp_rank::dp]  # same draws on every rank
        metrics = actor.sft_step(collate(sft_rows(prompts, tokenizer), tokenizer.pad_token_id))
        loss = _global_loss(actor, metrics)
        losses.append(loss)
        lrs.append(float(metrics["lr"]))
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{metrics['lr']:.2e}", skipped=int(metrics["skipped"]))
    bar.close()
    save_hf(actor, hf_config, args.out, model_dir)
    return dict(losses=losses, lrs=lrs, out=args.out, actor=actor, loader=loader, tokenizer=tokenizer)


def _global_loss(actor, metrics) -> float:
    """Each data-parallel rank holds its share of the global token-mean; their sum is the loss."""
    import torch.distributed as dist

    loss = torch.tensor([metrics["loss"]], dtype=torch.float64)
    if actor.info.dp_size > 1:
        from megatron.core import parallel_state as ps

        dist.all_reduce(loss, group=ps.get_data_parallel_group())
    return float(loss[0])


class _NoBar:
    def update(self, n):
        pass

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass


def _progress(total: int, show: bool):
    if not show:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="sft", unit="step", file=sys.stderr)


def run(args) -> int:
    if os.path.exists(args.out):
        print(f"dualrpo sft: {args.out} already exists; choose a new --out", file=sys.stderr)
        return 2
    if args.steps < 1 or args.batch_size < 1:
        print("dualrpo sft: --steps and --batch-size must be >= 1", file=sys.stderr)
        return 2
    if not 0.0 <= args.decay_fraction < 1.0:
        print(f"dualrpo sft: --decay-fraction must lie in [0, 1), got {args.decay_fraction}", file=sys.stderr)
        return 2
    result = train(args)
    import torch.distributed as dist

    if dist.get_rank() == 0:
        first, last = result["losses"][0], result["losses"][-1]
        print(f"sft: {len(result['losses'])} steps, loss {first:.4f} -> {last:.4f}; wrote {result['out']}")
    from dualrpo_mcore.parallel import teardown

    teardown()
    dist.destroy_process_group()
    return 0
