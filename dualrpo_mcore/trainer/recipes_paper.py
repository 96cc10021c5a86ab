"""Recipes at scale: the DualRPO paper reproduction on Qwen2.5-VL-7B and a 32B multi-node run.

The training set is V-Triune's Orsta-Data-47k, the corpus the DualRPO paper trains on (its totals:
:data:`PAPER_TOTAL` and below). ``DATA`` is the dataset's ``train/`` folder as downloaded
(``train_{task}_{source}_{n}.parquet``), read as published, with V-Triune's rewards, prompt
instructions and image sizing on (``data.reward_profile='vtriune'``, ``data.instructions``,
``data.image_resize``): docs/vtriune.md.

Every recipe here builds without any file existing (``init=None`` gives the released architecture
as a randomly initialised preset): the memory planner and the benchmarks only need the shapes.
"""
from __future__ import annotations

import glob
import math
import os
import re
from dataclasses import dataclass
from typing import List, Optional, Tuple

from dualrpo_mcore.data import DataConfig, SourceConfig
from dualrpo_mcore.data.schema import PERCEPTION_TASKS, REASONING_TASKS
from dualrpo_mcore.data.vtriune_prompts import VTRIUNE_IMAGE_RESIZE, VTRIUNE_INSTRUCTIONS
from dualrpo_mcore.models.qwen2_5_vl.training import ModuleTraining
from dualrpo_mcore.rollout.engine import SamplingParams

from dualrpo_mcore.actor.config import ActorConfig, KLConfig, MicroBatchConfig, ModelSourceConfig, OptimConfig
from .overrides import apply_overrides
from .recipes import Layout, default_world, heldout_eval, recipe  # noqa: F401 (default_world: planner imports it)
from .rl_config import (CheckpointConfig, LoggingConfig, RewardConfig, RLConfig, RolloutConfig,
                        ScheduleConfig, VerifierConfig)

GPUS_PER_H100_NODE = 8


@dataclass(frozen=True)
class OrstaSource:
    """One training file of Orsta-Data-47k: ``train_{task}_{source}_{size}[_x{copies}].parquet``."""

    task: str
    source: str
    size: int
    verified: bool
    copies: int = 1

    @property
    def samples(self) -> int:
        return self.size * self.copies


# PAPER TOTALS (verified): 47.7K samples, 18 datasets, 8 tasks, ~27.1K reasoning / ~20.6K perception,
# V-Triune paper section 5.1.1 (the PDF in github.com/MiniMax-AI/One-RL-to-See-Them-All).
PAPER_TOTAL = 47_700
PAPER_REASONING = 27_100
PAPER_PERCEPTION = 20_600
# REASONING_TASKS / PERCEPTION_TASKS: the two groups those totals count, from data.schema (imported above)

# Per-file sizes. The dataset's file names carry their sample counts, but only four file names are
# printed in a source we could read (the V-Triune README and scripts/train.sh): those are marked
# verified. The dataset sources per task come from V-Triune section 5.1.1 (verified); the source
# tokens of the other file names and their sizes are NOT verified: each unverified file gets an equal
# share of what its group total (27.1K / 20.6K) leaves after the verified files. They only matter
# when the real files are absent; with the files present, the counts in their names are used instead.
_VERIFIED = [
    OrstaSource("math", "mmmath", 3539, True),          # train_math_mmmath_3539.parquet (README)
    OrstaSource("puzzle", "puzzlevqa", 2648, True, 2),  # train_puzzle_puzzlevqa_2648_x2 (train.sh): duplicated
    OrstaSource("chart", "chartqapro", 498, True),      # train_chart_chartqapro_498.parquet (README)
    OrstaSource("detection", "v3det", 4000, True),      # train_detection_v3det_4000.parquet (README)
]
# 18 files for the paper's 18 datasets: PuzzleVQA + AlgoPuzzleVQA share one file (merged, section 5.1.1)
# while ViRL39K's science and chart categories are two.
_UNVERIFIED = [  # (task, source token) -- the dataset is named in the paper, the file name is our guess
    ("math", "geometry3k"), ("math", "mmk12"), ("puzzle", "visualpuzzles"),
    ("science", "scienceqa"), ("science", "scivqa"), ("science", "virl39k"),
    ("chart", "chartx"), ("chart", "tablevqa"), ("chart", "virl39k"),
    ("detection", "object365"), ("grounding", "d3"), ("counting", "clevr"),
    ("ocr", "llavaov"), ("ocr", "estvqa"),
]


def _estimated_table() -> List[OrstaSource]:
    out = list(_VERIFIED)
    for tasks, total in ((REASONING_TASKS, PAPER_REASONING), (PERCEPTION_TASKS, PAPER_PERCEPTION)):
        known = sum(s.samples for s in _VERIFIED if s.task in tasks)
        guessed = [(t, s) for t, s in _UNVERIFIED if t in tasks]
        share, extra = divmod(total - known, len(guessed))  # the remainder goes one each to the first files
        out += [OrstaSource(t, s, share + (i < extra), False) for i, (t, s) in enumerate(guessed)]
    return out


ORSTA_TRAIN: List[OrstaSource] = _estimated_table()

_FILE = re.compile(r"^train_(?P<task>[a-z]+)_(?P<source>.+?)_(?P<size>\d+)(?:_x(?P<copies>\d+))?\.parquet$")


def discover_orsta(data_dir: str) -> List[Tuple[str, OrstaSource]]:
    """``(path, source)`` for every ``train_{task}_{source}_{n}[_xK].parquet`` in ``data_dir`` (sorted);
    empty when the directory or the files are absent (the recipe then falls back to the table)."""
    paths = sorted(glob.glob(os.path.join(data_dir, "train_*.parquet")))
    return [(p, OrstaSource(m["task"], m["source"], int(m["size"]), True, int(m["copies"] or 1)))
            for p in paths if (m := _FILE.match(os.path.basename(p)))]


def orsta_data(data_dir: str, processor_dir: str, seed: int) -> Tuple[DataConfig, int]:
    """The 18-file mix weighted by sample counts, and the number of samples it holds (one epoch): Orsta's
    parquet files read as published, scored by V-Triune's rewards, with their prompt pool and image sizing."""
    found = discover_orsta(data_dir)
    if not found:  # planning without the data: the table's paths, opened only by the loader
        found = [(os.path.join(data_dir, f"train_{s.task}_{s.source}_*.parquet"), s) for s in ORSTA_TRAIN]
    sources = [SourceConfig(path=p, weight=float(s.samples), name=f"{s.task}/{s.source}") for p, s in found]
    samples = sum(s.samples for _, s in found)
    data = DataConfig(sources=sources, seed=seed, shuffle=True, processor_dir=processor_dir,
                      # 1280 merged patches at most (the DataConfig default): bounds vision tokens per prompt.
                      # V-Triune's processor keeps up to 2048x2048 after its resize (~5.3K tokens); this
                      # bound is what the memory plan was sized for (docs/vtriune.md, "image sizing").
                      max_pixels=28 * 28 * 1280, max_prompt_tokens=4096,
                      reward_profile="vtriune", instructions=dict(VTRIUNE_INSTRUCTIONS),
                      image_resize={t: list(b) for t, b in VTRIUNE_IMAGE_RESIZE.items()})
    return data, samples


def _model(init: Optional[str], preset: str, recompute: str) -> ModelSourceConfig:
    # V-Triune's scripts/train.sh freezes the ViT and the connector (ACTOR_LR_FREEZE=[vit,connector]);
    # only the language model trains. Whether the DualRPO paper did the same is not stated in what we read.
    training = ModuleTraining(freeze_vision=True, freeze_merger=True)
    where = dict(hf_dir=init) if init else dict(preset=preset)
    return ModelSourceConfig(**where, precision="bf16", spec_backend="te", recompute=recompute, training=training)


def paper_config(data_dir: str, init: Optional[str], run_dir: str, *, preset: str, layout: Layout, recompute: str,
                 micro_tokens: int, engine_options: dict, seed: int, processor_dir: Optional[str]) -> RLConfig:
    """The shared body of the paper-scale recipes: one epoch of Orsta-Data-47k at 128 prompts per step,
    G=8, 2048 new tokens (``--set schedule.steps=...`` and the like change them afterwards; the epoch
    is counted at the recipe's 128 prompts per step)."""
    processor_dir = processor_dir or init or os.path.join(data_dir, "processor")
    data, samples = orsta_data(data_dir, processor_dir, seed)
    prompts_per_step = 128  # our choice; G=8 and 2048 new tokens follow V-Triune (ROLLOUT_N, DATA_MAX_RES_LENGTH)
    actor = ActorConfig(
        model=_model(init, preset, recompute), parallel=layout.parallel(),
        # Paper: lr 1e-6, 5% linear warm-up, then constant (OptimConfig's schedule).
        optim=OptimConfig(lr=1e-6, warmup_fraction=0.05, distributed_optimizer=True),
        micro=MicroBatchConfig(max_tokens=micro_tokens),
        # beta0 = 0: the paper's main runs drop the reference KL; beta_min is the eq. 4 floor if it is turned on.
        kl=KLConfig(beta0=0.0, beta_min=0.05), seed=seed + 1234)
    return RLConfig(
        actor=actor, data=data,
        rollout=RolloutConfig(engine="sglang", group_size=8, bucket_mb=512, seed=seed,
                              engine_options=dict(engine_options),
                              sampling=SamplingParams(temperature=1.0, max_new_tokens=2048)),
        reward=RewardConfig(mode="dualrpo", mu=0.01, lam=0.005),
        # 1024 responses per step: a 5 s budget each over 32 worker processes keeps scoring well under rollout time.
        verifier=VerifierConfig(workers=32, timeout_s=5.0),
        schedule=ScheduleConfig(steps=math.ceil(samples / prompts_per_step), prompts_per_step=prompts_per_step),
        checkpoint=CheckpointConfig(every=25, keep_last=3),
        # The tokenizer is data.processor_dir's (RLConfig.tokenizer_path): one stored path.
        # A held-out file is optional: Orsta's test split is many files, so point DATA/heldout.parquet at one mix.
        eval=heldout_eval(data_dir, every=25, max_samples=512), logging=LoggingConfig(run_dir=run_dir))


# One 8xH100 node; TP=2 (28 heads / 4 KV heads split evenly) leaves DP=4 for throughput.
PAPER_7B = Layout(tp=2, pp=1, nodes=1, gpus_per_node=GPUS_PER_H100_NODE)


@recipe("qwen2_5_vl_7b_paper", PAPER_7B)
def qwen2_5_vl_7b_paper(data_dir: str, init: Optional[str] = None, run_dir: str = "runs/qwen2_5_vl_7b_paper", *,
                        seed: int = 0, processor_dir: Optional[str] = None) -> RLConfig:
    """The DualRPO paper run: Qwen2.5-VL-7B-Instruct (``init``: its HF directory), Orsta-Data-47k for one
    epoch, one 8xH100 node. TP=2 leaves DP=4 for throughput; the 7B weights + sharded Adam state fit
    beside the colocated SGLang engine. Full recomputation: `dualrpo plan` puts selective
    recomputation 0.1 GiB over 80 GB in the worst case (2K-token responses, max-size images), full at
    58 GiB."""
    return paper_config(
        data_dir, init, run_dir, preset="qwen2.5-vl-7b", layout=PAPER_7B, recompute="full", micro_tokens=16384,
        seed=seed, processor_dir=processor_dir,
        # SGLang on rank 0: TP=4 is the widest split of 28 heads; 0.5 of each GPU for weights + KV cache
        # leaves the rest to the resident Megatron params, gradients and optimizer shards.
        engine_options={"mem_fraction_static": 0.5, "tp_size": 4})


@recipe("qwen2_5_vl_7b_paper_grpo", PAPER_7B)
def qwen2_5_vl_7b_paper_grpo(data_dir: str, init: Optional[str] = None,
                             run_dir: str = "runs/qwen2_5_vl_7b_paper_grpo", *, seed: int = 0,
                             processor_dir: Optional[str] = None) -> RLConfig:
    """The GRPO baseline of the paper: the same run with verifier rewards only (``reward.mode='grpo'``)."""
    return apply_overrides(qwen2_5_vl_7b_paper(data_dir, init, run_dir, seed=seed, processor_dir=processor_dir),
                           ["reward.mode=grpo"])


# TP=4 inside a node (NVLink; the ViT's ffn of 3420 splits over TP 1, 2 or 4 only, so TP=8 cannot
# build), PP=4 across the 64 layers, DP=2 over 4 nodes x 8 H100.
PAPER_32B = Layout(tp=4, pp=4, nodes=4, gpus_per_node=GPUS_PER_H100_NODE)


@recipe("qwen2_5_vl_32b", PAPER_32B)
def qwen2_5_vl_32b(data_dir: str, init: Optional[str] = None, run_dir: str = "runs/qwen2_5_vl_32b", *,
                   seed: int = 0, processor_dir: Optional[str] = None) -> RLConfig:
    """DualRPO on Qwen2.5-VL-32B-Instruct over 4 nodes x 8 H100 (:data:`PAPER_32B`); full recomputation
    because 32B activations at 2K-token responses do not fit beside the weights otherwise
    (`dualrpo plan --recipe qwen2_5_vl_32b`: 54 GiB peak per GPU)."""
    return paper_config(
        data_dir, init, run_dir, preset="qwen2.5-vl-32b", layout=PAPER_32B, recompute="full", micro_tokens=8192,
        seed=seed, processor_dir=processor_dir,
        # The engine shards like the actor (TP=4: 40 heads / 8 KV heads and the ViT split evenly).
        engine_options={"mem_fraction_static": 0.5, "tp_size": 4})
