"""``dualrpo plan``: per-GPU memory of a recipe (or a preset) before it is launched.

The model is :mod:`.memory` (its docstring lists every term and why). This command turns a recipe into
that model's inputs, prints one table per pipeline stage's GPU (GiB per component, the peak of the
training and rollout phases against the GPU's capacity) and a verdict.

Workload assumptions (worst case, so a plan that fits does not OOM on a long batch): the longest row is
``prompt + max_new_tokens`` tokens, every prompt ``data.max_prompt_tokens`` when the recipe
sets it (else the image tokens + 256 text tokens), and carries ``--images-per-prompt``
images of ``data.max_pixels`` pixels. The worst micro-batch (its shortest rows: ``--shortest-row``) and
what it costs packed or padded: docs/design.md section 5, "Memory plan".

Exit status: 0 = fits and the KV cache holds the step's rollouts, 1 = DOES NOT FIT (the peak exceeds
the GPU, or SGLang's share of the memory the actor leaves free is below its weights), 3 = fits but the
KV cache is too small for all of the step's rollouts at once (SGLang then queues requests: slower,
not an out-of-memory), 2 = bad arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from typing import Any, Dict, Optional, Tuple

from dualrpo_mcore.models.qwen2_5_vl.config import RECOMPUTE

from dualrpo_mcore.planner import memory as M

DEFAULT_GPU_GB = 80.0
TEXT_TOKENS = 256  # text tokens of a prompt besides its images, when the recipe does not cap prompts


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--recipe", help="a recipe name (dualrpo_mcore.trainer.recipes.RECIPES)")
    src.add_argument("--preset", help="a Qwen2.5-VL preset (e.g. qwen2.5-vl-7b) with the flags below instead of a recipe")
    p.add_argument("--data", help="data dir the recipe is built with (tiny_cpu reads DATA/model/); "
                   "default: an empty temporary dir")
    p.add_argument("--init", help="HF checkpoint dir the recipe is built with (default: none, the preset)")
    p.add_argument("--nodes", type=int, help="nodes (default: the recipe's world, else 1)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node (default: the recipe's world, else 8)")
    p.add_argument("--tp", type=int, help="tensor-parallel size (default: the recipe's)")
    p.add_argument("--pp", type=int, help="pipeline-parallel size (default: the recipe's)")
    p.add_argument("--recompute", choices=RECOMPUTE, help="default: the recipe's")
    p.add_argument("--micro-tokens", type=int, help="tokens per micro-batch (default: actor.micro.max_tokens)")
    p.add_argument("--seq-len", type=int, help="tokens per row (default: prompt + max_new_tokens)")
    p.add_argument("--prompt-len", type=int, help="prompt tokens per row (default: see the module docstring)")
    p.add_argument("--shortest-row", type=int, help="tokens of the shortest row a micro-batch may hold (default: "
                   "prompt + 1, a response that ends at once; --seq-len models rows of one length)")
    p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=None,
                   help="model packed micro-batches, one [1, T] stream (default: the recipe's actor.model.packing)")
    p.add_argument("--images-per-prompt", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--gpu-mem-gb", type=float, default=DEFAULT_GPU_GB, help="GPU memory in GB (1e9 bytes), default 80")
    p.add_argument("--mem-fraction", type=float, help="SGLang mem_fraction_static (default: the recipe's "
                   "rollout.engine_options, 0 without an SGLang engine)")
    p.add_argument("--overhead-gb", type=float, default=2.0, help="CUDA context + NCCL + allocator slack per GPU, GiB")
    p.add_argument("--backend", choices=M.BACKENDS, help="layer spec to model: te (GPU) or local (default: the "
                   "recipe's spec_backend as a GPU node with the te extra resolves it: auto -> te)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    # With --preset (no recipe), the run's shape:
    p.add_argument("--prompts-per-step", type=int, default=128, help="with --preset: prompts per step")
    p.add_argument("--group-size", type=int, default=8, help="with --preset: responses per prompt")
    p.add_argument("--max-new-tokens", type=int, default=2048, help="with --preset: response length")
    p.add_argument("--dtype", choices=sorted(M.DTYPE_BYTES), default="bf16", help="with --preset: param dtype")
    p.add_argument("--sglang-tp", type=int, help="SGLang tp_size (default: the recipe's, else 1)")


def _check_args(a) -> None:
    for flag in ("nodes", "gpus_per_node", "tp", "pp", "micro_tokens", "seq_len", "prompt_len", "sglang_tp",
                 "shortest_row"):
        v = getattr(a, flag)
        if v is not None and v < 1:
            raise ValueError(f"--{flag.replace('_', '-')}={v}: must be >= 1")
    if a.images_per_prompt < 0:
        raise ValueError(f"--images-per-prompt={a.images_per_prompt}: must be >= 0")
    if not a.gpu_mem_gb > 0:
        raise ValueError(f"--gpu-mem-gb={a.gpu_mem_gb}: must be > 0")
    if a.mem_fraction is not None and not 0 <= a.mem_fraction < 1:
        raise ValueError(f"--mem-fraction={a.mem_fraction}: must lie in [0, 1)")
    if a.overhead_gb < 0:
        raise ValueError(f"--overhead-gb={a.overhead_gb}: must be >= 0")


def _recipe_inputs(a) -> Dict[str, Any]:
    """What the plan needs from a recipe's RLConfig (overridable flags applied later)."""
    from dualrpo_mcore.actor.megatron_setup import resolve_model_config
    from dualrpo_mcore.trainer.recipes import build_recipe

    data = a.data or tempfile.mkdtemp(prefix="dualrpo-plan-")
    try:
        cfg = build_recipe(a.recipe, data, a.init, os.path.join(data, "run"))
    except FileNotFoundError as e:
        raise ValueError(f"--recipe {a.recipe}: needs files the recipe reads ({e}); pass --data DIR "
                         f"(e.g. one written by `dualrpo data synth`)") from e
    actor, ro, mt = cfg.actor, cfg.rollout, cfg.actor.model.training
    opts = ro.engine_options if ro.engine == "sglang" else {}
    kl = actor.kl
    return dict(
        model=resolve_model_config(actor.model), tp=actor.parallel.tp, pp=actor.parallel.pp,
        dtype=actor.model.precision, recompute=actor.model.recompute,
        distributed_optimizer=actor.optim.distributed_optimizer,
        backend=plan_backend(actor.model), fused_head=actor.model.fused_head, packing=actor.model.packing,
        freeze=(mt.freeze_vision, mt.freeze_merger, mt.freeze_language),
        micro_tokens=actor.micro.max_tokens, prompts=cfg.schedule.prompts_per_step, group=ro.group_size,
        max_new=ro.sampling.max_new_tokens, max_prompt=cfg.data.max_prompt_tokens, max_pixels=cfg.data.max_pixels,
        mem_fraction=float(opts.get("mem_fraction_static", 0.0)), sglang_tp=int(opts.get("tp_size", 1)),
        reference="none" if not kl.enabled else ("offload" if kl.offload_reference else "gpu"),
        world=_recipe_world(a.recipe))


def plan_backend(model_src) -> str:
    """The spec the recipe's run will build, by the trainer's own rule (``specs.resolve_backend``)
    for the nodes the plan is for: they have CUDA, and the ``te`` extra is assumed installed there
    (model a node without it with ``--backend local``). So 'auto' plans as 'te', as on those nodes."""
    return model_src.resolve_backend(cuda_available=True, te_available=True)


def _recipe_world(name: str) -> Optional[Tuple[int, int]]:
    try:
        from dualrpo_mcore.trainer.recipes_paper import default_world

        return default_world(name)
    except (ImportError, KeyError):
        return None


def _preset_inputs(a) -> Dict[str, Any]:
    from dualrpo_mcore.data import DataConfig
    from dualrpo_mcore.models.qwen2_5_vl import from_hf, presets
    from dualrpo_mcore.actor.config import ModelSourceConfig

    try:
        model = from_hf(presets.hf_config_dict(a.preset))
    except KeyError as e:
        raise ValueError(f"--preset {a.preset!r}: {e.args[0]}") from e
    return dict(model=model, tp=1, pp=1, dtype=a.dtype, recompute="none", distributed_optimizer=True,
                backend="te", fused_head=ModelSourceConfig.fused_head, packing=ModelSourceConfig.packing,
                freeze=(False, False, False),
                micro_tokens=8192, prompts=a.prompts_per_step,
                group=a.group_size, max_new=a.max_new_tokens, max_prompt=None,
                max_pixels=DataConfig().max_pixels, mem_fraction=0.0, sglang_tp=1, reference="none", world=None)


def build(a) -> Tuple[Any, M.Plan, Dict[str, Any]]:
    """(model config, plan, the resolved inputs shown in the header)."""
    _check_args(a)
    inp = _recipe_inputs(a) if a.recipe else _preset_inputs(a)
    cfg = inp["model"]
    nodes, gpn = inp["world"] or (1, 8)
    nodes, gpn = a.nodes or nodes, a.gpus_per_node or gpn
    tp, pp = a.tp or inp["tp"], a.pp or inp["pp"]
    world = nodes * gpn
    if world % (tp * pp):
        raise ValueError(f"--nodes {nodes} x --gpus-per-node {gpn} = {world} GPUs is not divisible by "
                         f"--tp {tp} x --pp {pp}")
    dp = world // (tp * pp)
    fv, fm, fl = inp["freeze"]
    layout = M.Layout(tp=tp, pp=pp, dp=dp, dtype=inp["dtype"], recompute=a.recompute or inp["recompute"],
                      distributed_optimizer=inp["distributed_optimizer"], backend=a.backend or inp["backend"],
                      freeze_vision=fv, freeze_merger=fm, freeze_language=fl, fused_head=inp["fused_head"])
    patches = a.images_per_prompt * (inp["max_pixels"] // cfg.patch_size ** 2)
    image_tokens = patches // cfg.spatial_merge_size ** 2
    prompt = a.prompt_len or inp["max_prompt"] or image_tokens + TEXT_TOKENS
    seq = a.seq_len or prompt + inp["max_new"]
    micro_tokens = a.micro_tokens or inp["micro_tokens"]
    rows_total = inp["prompts"] * inp["group"]
    packing = inp["packing"] if a.packing is None else a.packing
    shortest = min(seq, a.shortest_row or prompt + 1)
    mb = worst_micro_batch(seq, shortest, micro_tokens, -(-rows_total // dp), patches, packing)
    mem_fraction = inp["mem_fraction"] if a.mem_fraction is None else a.mem_fraction
    sglang_tp = a.sglang_tp or inp["sglang_tp"]
    coloc = M.Colocation(gpu_bytes=int(a.gpu_mem_gb * 1e9), mem_fraction=mem_fraction, sglang_tp=sglang_tp,
                         rollout_tokens=rows_total * seq, sglang_instances=1,
                         overhead_bytes=int(a.overhead_gb * M.GIB), reference=inp["reference"])
    try:
        result = M.plan(cfg, layout, mb, -(-rows_total // dp), coloc)
    except ValueError as e:  # the model cannot be split this way: say which flag chose the split
        raise ValueError(f"--tp {tp} / --pp {pp} (recipe actor.parallel unless overridden): {e}") from e
    header = dict(source=f"recipe {a.recipe}" if a.recipe else f"preset {a.preset}", nodes=nodes,
                  gpus_per_node=gpn, tp=tp, pp=pp, dp=dp, dtype=layout.dtype, recompute=layout.recompute,
                  backend=layout.backend, distributed_optimizer=layout.distributed_optimizer,
                  fused_head=layout.fused_head,
                  frozen=[n for n, f in zip(("vision", "merger", "language"), inp["freeze"]) if f],
                  prompt_tokens=prompt, seq_len=seq, patches_per_row=patches, micro_tokens=micro_tokens,
                  shortest_row=shortest, packed=packing, tokens_per_microbatch=mb.tokens,
                  rows_per_microbatch=mb.rows, microbatches_per_step=result.num_microbatches,
                  rows_per_step=rows_total, mem_fraction_static=mem_fraction, sglang_tp=sglang_tp,
                  reference=inp["reference"], gpu_gb=a.gpu_mem_gb)
    return cfg, result, header


def worst_micro_batch(seq: int, shortest: int, max_tokens: int, rows_per_rank: int, patches: int,
                      packed: bool) -> M.MicroBatch:
    """The largest micro-batch the actor's partition can form: one row of ``seq`` tokens plus as many
    ``shortest``-token rows as keep it within ``max_tokens`` real tokens (a row over the budget runs
    alone). Packed it costs its real tokens (at most the budget, or ``seq``); padded, every row ``seq``."""
    rows = 1 + max(0, max_tokens - seq) // shortest
    rows = max(1, min(rows, rows_per_rank))
    # Rows between the shortest and the longest fill the budget; the padded layout does not care which.
    real = max(seq, min(max_tokens, rows * seq))
    return M.MicroBatch(rows=rows, seq_len=seq, patches_per_row=patches, packed=packed, real_tokens=real)


def _layout_line(h: Dict[str, Any]) -> str:
    if h.get("packed"):
        return f"micro-batches packed (T <= {h['tokens_per_microbatch']} tokens, one stream)"
    return (f"micro-batches padded ({h['rows_per_microbatch']} x {h['seq_len']} = {h['tokens_per_microbatch']} "
            f"tokens, shortest row {h['shortest_row']})")


def _gib(n: float) -> str:
    return f"{n / M.GIB:8.2f}"


def to_dict(result: M.Plan, header: Dict[str, Any]) -> Dict[str, Any]:
    worst = result.worst
    return dict(
        inputs=header, fits=result.fits, kv_sufficient=result.kv_sufficient,
        gpu_bytes=result.coloc.gpu_bytes, peak_bytes=worst.peak, worst_stage=worst.stage,
        biggest=M.biggest(worst), kv_capacity_tokens=result.kv_capacity, kv_needed_tokens=result.kv_needed,
        kv_pool_bytes=result.kv_pool, sglang_starts=result.sglang_starts,
        stages=[dict(stage=s.stage, params=s.params, trainable=s.trainable, components=s.components,
                     train_peak=s.train_peak, rollout_peak=s.rollout_peak, reference_peak=s.reference_peak,
                     held_at_engine_start=s.held_at_engine_start, peak=s.peak) for s in result.stages])


def format_plan(result: M.Plan, header: Dict[str, Any]) -> str:
    h = header
    lines = [f"dualrpo plan: {h['source']} on {h['nodes']} node(s) x {h['gpus_per_node']} GPU(s) of "
             f"{h['gpu_gb']:g} GB; TP={h['tp']} PP={h['pp']} DP={h['dp']}, {h['dtype']}, recompute={h['recompute']}, "
             f"{h['backend']} spec, distributed optimizer {'on' if h['distributed_optimizer'] else 'off'}, "
             f"output head {'fused (no logits stored)' if h.get('fused_head') else 'unfused'}, frozen: {', '.join(h['frozen']) or 'nothing'}",
             f"workload: rows of {h['shortest_row']} to {h['seq_len']} tokens (prompt {h['prompt_tokens']}, "
             f"{h['patches_per_row']} ViT patches), up to {h['rows_per_microbatch']} row(s) per micro-batch of <= "
             f"{h['micro_tokens']} real tokens, {h['microbatches_per_step']} micro-batches per DP rank per step; "
             f"reference: {h['reference']}",
             f"{_layout_line(h)}",
             ""]
    names = list(result.stages[0].components)
    lines.append(f"{'per GPU, GiB':<34}" + "".join(f"{'stage ' + str(s.stage):>10}" for s in result.stages))
    for n in names:
        lines.append(f"{n:<34}" + "".join(f"{_gib(s.components[n]):>10}" for s in result.stages))
    lines.append(f"{'= training phase':<34}" + "".join(f"{_gib(s.train_peak):>10}" for s in result.stages))
    lines.append(f"{'= rollout phase':<34}" + "".join(f"{_gib(s.rollout_peak):>10}" for s in result.stages))
    if any(s.reference_peak for s in result.stages):
        lines.append(f"{'= reference forward':<34}" + "".join(f"{_gib(s.reference_peak):>10}" for s in result.stages))
    lines.append(f"{'PEAK':<34}" + "".join(f"{_gib(s.peak):>10}" for s in result.stages))
    cap = result.coloc.gpu_bytes
    lines.append(f"{'GPU capacity':<34}" + "".join(f"{_gib(cap):>10}" for _ in result.stages))
    worst = result.worst
    verdict = "FITS" if result.fits else "DOES NOT FIT"
    lines += ["", f"{verdict}: peak {worst.peak / M.GIB:.2f} GiB on a stage-{worst.stage} GPU vs {cap / M.GIB:.2f} GiB "
              f"({100 * worst.peak / cap:.0f}%); biggest: {', '.join(M.biggest(worst))}"]
    co = result.coloc
    if co.mem_fraction and not result.sglang_starts:
        lines.append(f"SGLang cannot start: mem_fraction_static={co.mem_fraction:g} of the "
                     f"{(co.gpu_bytes - result.stages[0].held_at_engine_start) / M.GIB:.2f} GiB free after the actor "
                     f"is built leaves {result.kv_pool / M.GIB:.2f} GiB for the KV cache after its weights")
    elif co.mem_fraction:
        kv = "enough" if result.kv_sufficient else "INSUFFICIENT (SGLang queues the rest: slower, not an OOM)"
        lines.append(f"SGLang KV cache (mem_fraction_static={co.mem_fraction:g} of the "
                     f"{(co.gpu_bytes - result.stages[0].held_at_engine_start) / M.GIB:.2f} GiB free when it starts, "
                     f"tp={co.sglang_tp}): {result.kv_pool / M.GIB:.2f} GiB = {result.kv_capacity:,} tokens; the step's "
                     f"{header['rows_per_step']} rollouts need {result.kv_needed:,} at once: {kv}")
    return "\n".join(lines)


def run(args) -> int:
    try:
        _, result, header = build(args)
    except ValueError as e:
        print(f"dualrpo plan: error: {e}")
        return 2
    print(json.dumps(to_dict(result, header), indent=1) if args.json else format_plan(result, header))
    if not result.fits:
        return 1
    return 0 if result.kv_sufficient else 3
