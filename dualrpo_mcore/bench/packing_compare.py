"""``dualrpo bench train --compare-packing``: the same rows, on the same actor and weights, as packed
streams (``actor.model.packing``, the default) and as padded ``[b, s]`` micro-batches.

The actor reads ``Actor.packing`` at every split, so flipping it between steps runs both layouts in one
process. The timed steps alternate the layouts (packed, padded, packed, ...) so that a drift of the
machine's speed during the run (a shared CPU) lands on both alike; each layout gets its warm-up first.

Reported per layout: tokens/s (real tokens of the batch / median step time / devices), peak extra memory
of one update step beyond what was allocated before it (CUDA: ``max_memory_allocated``; CPU: the
profiler's allocator events, one untimed step; the maximum over ranks), and the layout's tokens.

FLOPs (``bench.flops.lm_forward``; the LM body = QKV/O projections, MLP and attention scores of every
layer; the output layer is left out because the fused head computes logits only at response positions
in both layouts): *useful* counts each row's real tokens; *padded* each micro-batch as ``b`` rows of its
``s`` columns; *packed* each stream's ``T`` tokens through the projections and, for attention, what the
layer executes: on Transformer Engine (varlen THD kernels) each row's own square, on the local spec
(what CPU runs) ``sum_b n_b L_b^2`` (docs/design.md §5, "Attention never crosses rows").
``padding_fraction`` = 1 - useful / padded: the share of the padded layout's LM FLOPs spent on padding.
``step_padding_fraction``: the same waste as a share of the padded step's model FLOPs (LM body, ViT with
merger, and the output head at the response positions where both layouts compute it; forward and
backward alike, so the ratio is the forward's). ``time_saved`` = 1 - packed step time / padded step time, to be read against them:
the gain matches the padding removed from the step when ``time_saved >= step_padding_fraction``, from the
LM when ``time_saved >= padding_fraction``.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List

import torch

LAYOUTS = ("packed", "padded")


def _body(fwd) -> float:
    return fwd.lm_linear + fwd.lm_attention


def layout_accounting(actor, cfg, batch: Dict[str, Any]) -> Dict[str, Any]:
    """Tokens and LM-body forward FLOPs of the batch's micro-batches in each layout (see the module
    docstring), from the actor's own split of this batch."""
    from dualrpo_mcore.actor import packed as packed_mod
    from dualrpo_mcore.models.qwen2_5_vl.packed_attention import length_buckets

    from . import flops

    was = actor.packing
    try:
        actor.packing = True
        _, packs = actor._split(batch)
        actor.packing = False
        _, pads = actor._split(batch)
    finally:
        actor.packing = was
    real = [int(x) for x in batch["attention_mask"].sum(-1).tolist()]
    padded_rows = [mb["input_ids"].shape[1] for mb in pads for _ in range(mb["input_ids"].shape[0])]
    streams = [mb[packed_mod.KEY] for mb in packs]
    varlen = actor.backend == "te"
    linear = bucketed = per_row = 0.0
    for pm in streams:
        cu = pm.packing.cu_seqlens.tolist()
        rows = [b - a for a, b in zip(cu[:-1], cu[1:]) if b > a] + ([pm.total - cu[-1]] if pm.total > cu[-1] else [])
        linear += flops.lm_forward(cfg, [pm.total]).lm_linear
        for bucket in length_buckets(rows):
            bucketed += flops.lm_forward(cfg, [max(rows[i] for i in bucket)] * len(bucket)).lm_attention
        per_row += flops.lm_forward(cfg, rows).lm_attention
    useful = _body(flops.lm_forward(cfg, real))
    padded = _body(flops.lm_forward(cfg, padded_rows))
    packed = linear + (per_row if varlen else bucketed)
    # What the same streams would cost with per-row (varlen) attention, whichever this actor runs.
    packed_varlen = linear + per_row
    vision = flops.vision_forward(cfg, batch["image_grid_thw"]).vision if "image_grid_thw" in batch else 0.0
    vocab = getattr(actor.module, "padded_vocab_size", cfg.vocab_size)
    head = flops.lm_forward(cfg, [int(batch["response_mask"].sum())], vocab).lm_output
    return dict(real_tokens=sum(real), padded_tokens=sum(padded_rows), packed_tokens=sum(pm.total for pm in streams),
                microbatches=len(pads),
                lm_body_forward_flops=dict(useful=useful, padded=padded, packed=packed, packed_varlen=packed_varlen),
                vision_forward_flops=vision, head_forward_flops=head,
                packed_attention="varlen (per row)" if varlen else "rows padded within length buckets (local spec)",
                padding_fraction=1 - useful / padded, step_padding_fraction=(padded - useful) / (padded + vision + head),
                packed_excess=packed / useful - 1,
                flops_speedup_bound=padded / packed, flops_speedup_bound_varlen=padded / packed_varlen)


def peak_step_bytes(step: Callable[[], Any]) -> int:
    """Peak bytes allocated during ``step()`` beyond those allocated before it, on this process."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    from torch.profiler import ProfilerActivity, profile

    from .common import profiler_peak_bytes

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    return int(profiler_peak_bytes(prof))


def _max_over_ranks(value: int) -> int:
    import torch.distributed as dist

    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.long, device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def measure(actor, batch: Dict[str, Any], iters: int, warmup: int, sync: Callable[[], Any],
            say: Callable[..., Any]) -> Dict[str, Dict[str, Any]]:
    """Per layout: median and all step times (alternating layouts) and peak extra memory of one step."""
    import statistics
    import time

    def step(layout: str):
        actor.packing = layout == "packed"
        actor.update(batch)

    for layout in LAYOUTS:
        for i in range(warmup):
            step(layout)
            say(f"  {layout}: warm-up {i + 1}/{warmup}", flush=True)
    times: Dict[str, List[float]] = {k: [] for k in LAYOUTS}
    for i in range(iters):
        for layout in LAYOUTS if i % 2 == 0 else LAYOUTS[::-1]:
            sync()
            t0 = time.perf_counter()
            step(layout)
            sync()
            times[layout].append(time.perf_counter() - t0)
            say(f"  {layout}: iter {i + 1}/{iters} {times[layout][-1]:.3f} s", flush=True)
    out = {}
    for layout in LAYOUTS:
        sync()
        peak = _max_over_ranks(peak_step_bytes(lambda: step(layout)))
        out[layout] = dict(median_s=statistics.median(times[layout]), times_s=times[layout], peak_extra_bytes=peak)
    actor.packing = True
    return out


def summarize(res: Dict[str, Any]) -> Dict[str, Any]:
    """Rows per layout and the packed/padded ratios, next to the padding fraction they should match."""
    acc, world, tokens = res["layouts"], res["world"], res["tokens"]
    rows = []
    for layout in LAYOUTS:
        r = res[f"layout_{layout}"]
        rows.append(dict(layout=layout, step_s=r["median_s"], tokens_per_s_per_device=tokens / r["median_s"] / world,
                         peak_extra_mib=r["peak_extra_bytes"] / 2 ** 20, layout_tokens=acc[f"{layout}_tokens"]))
    pk, pd = rows
    speedup = pk["tokens_per_s_per_device"] / pd["tokens_per_s_per_device"]
    saved = 1 - pk["step_s"] / pd["step_s"]
    copied = ("real_tokens", "microbatches", "padding_fraction", "step_padding_fraction", "packed_excess",
              "packed_attention", "flops_speedup_bound", "flops_speedup_bound_varlen")
    return dict(rows=rows, **{k: acc[k] for k in copied}, speedup=speedup, time_saved=saved,
                memory_ratio=pk["peak_extra_mib"] / pd["peak_extra_mib"] if pd["peak_extra_mib"] else float("nan"),
                gain_matches_padding=saved >= acc["padding_fraction"],
                gain_matches_step_padding=saved >= acc["step_padding_fraction"])


def print_table(s: Dict[str, Any], lengths: Dict[str, float]) -> None:
    print(f"\npacked vs padded  real tokens={s['real_tokens']} micro-batches={s['microbatches']}  response lengths "
          f"min {lengths['min']} median {lengths['median']:g} mean {lengths['mean']:.1f} max {lengths['max']}")
    print(f"{'layout':<8}{'tokens':>8}{'step s':>9}{'tok/s/dev':>11}{'peak MiB':>10}")
    for r in s["rows"]:
        print(f"{r['layout']:<8}{r['layout_tokens']:>8}{r['step_s']:>9.3f}{r['tokens_per_s_per_device']:>11.1f}"
              f"{r['peak_extra_mib']:>10.1f}")
    print(f"padding: {100 * s['padding_fraction']:.1f}% of the padded layout's LM FLOPs, "
          f"{100 * s['step_padding_fraction']:.1f}% of its step's (LM, ViT, head); packed executes "
          f"{100 * s['packed_excess']:+.1f}% over the useful LM ones (attention: {s['packed_attention']})")
    print(f"packed/padded: speed-up {s['speedup']:.2f}x (time saved {100 * s['time_saved']:.1f}%, "
          f"LM-FLOPs bound {s['flops_speedup_bound']:.2f}x, {s['flops_speedup_bound_varlen']:.2f}x with per-row "
          f"attention), peak memory {s['memory_ratio']:.2f}x; "
          f"gain {'>=' if s['gain_matches_step_padding'] else '<'} the step's padding fraction, "
          f"{'>=' if s['gain_matches_padding'] else '<'} the LM's")
