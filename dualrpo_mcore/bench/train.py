"""``dualrpo bench train``: train-step throughput and MFU of the Megatron actor.

One step is ``Actor.update`` (forward + backward of the DualRPO policy loss over the batch's
micro-batches, gradient clip, optimizer step) on a synthetic batch of rows that each hold text,
``--images-per-row`` images of ``--image`` patches and a response of up to ``--response-len`` tokens:
all of them with ``--length-mix fixed`` (equal lengths: no padding), else drawn per row from the demo's
rollouts or a heavy-tailed mix (``bench.length_mix``). ``--compare-packing`` times the same rows as
packed streams and as padded micro-batches (``bench.packing_compare``). Reported per device (GPU, or
process on CPU):

* tokens/s = real tokens of the batch / median step time / devices
* MFU = model FLOPs of the step (``bench.flops``: LM + ViT + merger for the batch's actual lengths and
  image grids, 3 x forward) / step time / devices / peak FLOP/s of one device; HFU adds the
  recomputed forward (``--recompute``). The peak is the table value of known GPUs (``common.GPU_PEAKS``),
  or on CPU a *measured matmul roofline*: the best FLOP/s of a large fp32 matmul in each process,
  measured in the same run with all processes busy, as the training ranks are (``--peak-tflops``
  overrides either).

Baseline in the same run (``hf-sdpa-adamw``): transformers' ``Qwen2_5_VLForConditionalGeneration`` of the
same config and dtype on one device, plain PyTorch: forward (SDPA attention), log-softmax log-probs,
the same ``algo.policy_loss``, backward, gradient clip, ``torch.optim.AdamW``. For tiny/small/medium its
steps alternate with the actor's (rank 0 runs it while the other ranks wait), so a drift of a shared
machine's speed lands on both; released sizes run it after the actor, which may not fit beside it. The
ratio column is the baseline's step time per device-token over the actor's (> 1 = the actor is faster).

Notes: under the TE spec the ViT's window attention is a masked dense product (docs/design.md §5), so its
executed FLOPs exceed the model FLOPs counted here (MFU counts useful work).
Warm-up iterations are excluded; the median of ``--iters`` is reported. CPU runs use
``run_distributed`` (gloo); under ``torchrun`` every rank runs this command and rank 0 reports.
"""
from __future__ import annotations

import argparse
import math
import os
from typing import Any, Dict, List, NamedTuple

import torch

from dualrpo_mcore.models.qwen2_5_vl.config import RECOMPUTE
from dualrpo_mcore.models.qwen2_5_vl.specs import BACKENDS

from .length_mix import MIXES

SMALL_MODELS = ("tiny", "small", "medium")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dualrpo_mcore.models.qwen2_5_vl import presets

    parser.add_argument("--model", default="tiny", choices=list(SMALL_MODELS) + presets.names(),
                        help="tiny (tests' config), small/medium (bench shapes), or a released size (random init)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument("--rows", type=int, default=4, help="rows (sequences) in the batch")
    parser.add_argument("--prompt-len", type=int, default=32, help="text tokens before the images")
    parser.add_argument("--response-len", type=int, default=64,
                        help="response tokens per row (trained on); the maximum under --length-mix demo/heavy-tail")
    parser.add_argument("--length-mix", default="fixed", choices=MIXES,
                        help="response lengths: fixed (all --response-len), demo (the demo's rollouts' histogram), "
                             "heavy-tail (log-normal, median max/8, clipped to [1, max]); seeded by --seed")
    parser.add_argument("--length-mix-file", default=None,
                        help="JSON histogram for --length-mix demo "
                             "(default benchmarks/results/response_lengths_demo.json)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic batch and its lengths")
    parser.add_argument("--image", default=None, help="image grid HxW in patches (default 8x8 small models, 28x28 presets)")
    parser.add_argument("--images-per-row", type=int, default=1, help="images per row (0 = text only)")
    parser.add_argument("--precision", default=None, choices=["fp32", "bf16"], help="default fp32 CPU, bf16 GPU")
    parser.add_argument("--spec", default=None, choices=BACKENDS,
                        help="Megatron layer spec (default auto on GPU: TE where it imports; local on CPU)")
    parser.add_argument("--fp8", default=None, choices=["hybrid", "e4m3"],
                        help="FP8 GEMMs through Transformer Engine (needs --precision bf16 and the te extra)")
    parser.add_argument("--recompute", default="none", choices=RECOMPUTE, help="LM recompute")
    parser.add_argument("--micro-tokens", type=int, default=None, help="micro-batch token budget (default: whole batch)")
    parser.add_argument("--iters", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s per device (overrides table/measured)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the transformers baseline")
    parser.add_argument("--no-packing", dest="packing", action="store_false",
                        help="padded [B, S] micro-batches instead of packed streams (actor.model.packing=false)")
    parser.add_argument("--compare-packing", action="store_true",
                        help="time the same rows packed and padded in this run (tokens/s, peak memory, padding FLOPs)")
    parser.add_argument("--json", default=None, help="write results here as JSON")


def check_args(args) -> None:
    """Fail early on a bad flag, naming it."""
    for name in ("tp", "pp", "rows", "iters", "response_len", "prompt_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or args.images_per_row < 0:
        raise ValueError("--warmup and --images-per-row must be >= 0")
    parse_grid(args.image or "8x8")
    if args.fp8 and args.precision != "bf16":
        raise ValueError("--fp8 needs --precision bf16 (the GEMMs outside FP8 run in bf16)")
    if args.fp8 and args.spec == "local":
        raise ValueError("--fp8 needs the Transformer Engine spec: --spec te or auto")
    if args.precision == "bf16" and not torch.cuda.is_available():
        raise ValueError("--precision bf16 needs a GPU here (Megatron's CPU path runs fp32)")
    if args.compare_packing and not args.packing:
        raise ValueError("--compare-packing runs both layouts: drop --no-packing")
    if args.length_mix_file and args.length_mix != "demo":
        raise ValueError("--length-mix-file is the histogram of --length-mix demo")
    if args.length_mix == "demo":
        from .length_mix import default_demo_file, load_histogram

        args.length_mix_file = args.length_mix_file or default_demo_file()
        try:
            load_histogram(args.length_mix_file)
        except (OSError, ValueError) as e:
            raise ValueError(f"--length-mix-file: {e}") from None


def parse_grid(text: str):
    try:
        h, w = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--image {text!r}: expected HxW in patches, e.g. 28x28") from None
    if h < 2 or w < 2 or h % 2 or w % 2:
        raise ValueError(f"--image {text!r}: H and W must be even (whole 2x2 merged units) and >= 2")
    return h, w


def hf_config(name: str):
    """The HF config object of ``--model``: "tiny" is the tests' shape, small/medium the bench shapes."""
    from dualrpo_mcore.models.qwen2_5_vl import presets

    return presets.hf_config(name if name == "tiny" or name not in SMALL_MODELS else f"bench-{name}")


def response_lengths(args) -> list:
    """Each row's response length under ``--length-mix`` (the same on every rank: seeded)."""
    from .length_mix import draw_lengths, load_histogram

    hist = load_histogram(args.length_mix_file) if args.length_mix == "demo" else None
    return draw_lengths(args.length_mix, args.rows, args.response_len, seed=args.seed, histogram=hist)


def synthetic_batch(cfg, rows: int, prompt_len: int, response_len, grid, images: int, seed: int = 0):
    """Rows of prompt text, ``images`` images of ``grid`` patches and response text, right-padded:
    ``response_len`` is every row's response length, or a list of one per row."""
    lens = [response_len] * rows if isinstance(response_len, int) else [int(x) for x in response_len]
    if len(lens) != rows:
        raise ValueError(f"{len(lens)} response lengths for {rows} rows")
    g = torch.Generator().manual_seed(seed)
    hf = cfg.hf
    special = [cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id,
               int(hf.get("vision_end_token_id", cfg.vision_start_token_id + 1))]
    top = min(min(special), cfg.vocab_size)  # ordinary text ids stay below every special id
    n_img = grid[0] * grid[1] // cfg.spatial_merge_size ** 2
    ids, resp = [], []
    for n_resp in lens:
        seq = torch.randint(3, top, (prompt_len,), generator=g).tolist()
        for _ in range(images):
            seq += [special[2]] + [cfg.image_token_id] * n_img + [special[3]]
        mask = [0] * len(seq) + [1] * n_resp
        seq += torch.randint(3, top, (n_resp,), generator=g).tolist()
        ids.append(seq)
        resp.append(mask)
    width = max(len(x) for x in ids)
    real = [len(x) for x in ids]
    # Right padding with id 0 (never the image token) and both masks 0: the actor batch's layout.
    batch: Dict[str, Any] = dict(input_ids=torch.tensor([x + [0] * (width - len(x)) for x in ids]),
                                 attention_mask=torch.tensor([[1] * n + [0] * (width - n) for n in real]),
                                 response_mask=torch.tensor([m + [0] * (width - len(m)) for m in resp]))
    if images:
        grids = torch.tensor([[1, grid[0], grid[1]]] * (rows * images))
        batch["pixel_values"] = torch.randn(int(grids.prod(-1).sum()), cfg.patch_dim, generator=g)
        batch["image_grid_thw"] = grids
    batch["advantages"] = torch.randn(rows, generator=g)
    return batch


def _sync():
    import torch.distributed as dist

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    if dist.is_initialized():
        dist.barrier()


def _peak(args) -> Dict[str, Any]:
    if args.peak_tflops:
        return {"flops": args.peak_tflops * 1e12, "source": "--peak-tflops", "device": "given"}
    from .common import gpu_peak, measured_matmul_peak

    if torch.cuda.is_available():
        peak = gpu_peak(args.precision or "bf16")
        if peak is None:
            raise ValueError(f"no peak FLOP/s known for {torch.cuda.get_device_name()}: pass --peak-tflops")
        return peak
    _sync()  # every rank measures at once: the cores are shared as in training
    return measured_matmul_peak()


def _actor(args, hf_cfg, tokens: int):
    from dualrpo_mcore.actor.actor import Actor
    from dualrpo_mcore.actor.config import ActorConfig, MicroBatchConfig, ModelSourceConfig, OptimConfig, ParallelConfig

    precision = args.precision or ("bf16" if torch.cuda.is_available() else "fp32")
    spec = args.spec or ("auto" if torch.cuda.is_available() else "local")
    common = dict(precision=precision, spec_backend=spec, recompute=args.recompute, fp8=args.fp8,
                  packing=getattr(args, "packing", True))
    if args.model in SMALL_MODELS:
        src = ModelSourceConfig(tiny=True, hf_config=hf_cfg, **common)
    else:
        src = ModelSourceConfig(preset=args.model, **common)
    cfg = ActorConfig(model=src, parallel=ParallelConfig(tp=args.tp, pp=args.pp),
                      optim=OptimConfig(lr=1e-6, warmup_fraction=0.0, total_steps=10 ** 6),
                      micro=MicroBatchConfig(max_tokens=args.micro_tokens or tokens))
    return Actor(cfg)


class Prepared(NamedTuple):
    hf_cfg: Any
    cfg: Any
    batch: Dict[str, Any]
    actor: Any
    lengths: List[int]


def prepare(rank: int, world: int, args) -> Prepared:
    """This rank's configs, batch (with the old log-probs the rollout step would provide; untimed), actor
    and response lengths, as the flags describe them. Also what ``benchmarks/probes/step_phases.py`` times."""
    import warnings

    # Spawned ranks do not inherit the parent's filters; Megatron's CPU-path notices drown the progress.
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    hf_cfg = hf_config(args.model)
    from dualrpo_mcore.models.qwen2_5_vl import from_hf

    cfg = from_hf(hf_cfg)
    grid = parse_grid(args.image or ("8x8" if args.model in SMALL_MODELS else "28x28"))
    lengths = response_lengths(args)
    batch = synthetic_batch(cfg, args.rows, args.prompt_len, lengths, grid, args.images_per_row, seed=args.seed)
    tokens = int(batch["attention_mask"].sum())
    if torch.cuda.is_available():  # Megatron builds the weights on the current GPU; the actor does not move inputs
        batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if rank == 0:
        print(f"bench train: building the actor ({args.model}, tp={args.tp}, pp={args.pp}, world={world})", flush=True)
    actor = _actor(args, hf_cfg, tokens)
    batch["old_logprob"] = actor.compute_token_stats(batch)["logprob"]
    return Prepared(hf_cfg, cfg, batch, actor, lengths)


def _worker(rank: int, world: int, args) -> Dict[str, Any]:
    from . import flops
    from .common import median_time

    hf_cfg, cfg, batch, actor, lengths = prepare(rank, world, args)
    say = print if rank == 0 else (lambda *a, **k: None)
    out: Dict[str, Any] = dict(response_lengths=lengths)
    # Every rank takes the same branches (they meet at barriers).
    alternate = not (args.compare_packing or args.no_baseline) and args.model in SMALL_MODELS
    if args.compare_packing:
        from . import packing_compare

        out["layouts"] = packing_compare.layout_accounting(actor, cfg, batch)
        both = packing_compare.measure(actor, batch, args.iters, args.warmup, _sync, say)
        out.update(megatron=both["packed"], megatron_padded=both["padded"],
                   layout_packed=both["packed"], layout_padded=both["padded"])
    elif not alternate:
        out["megatron"] = median_time(lambda: actor.update(batch), args.iters, args.warmup, _sync,
                                      progress="megatron" if rank == 0 else "")
    else:  # alternating: see the module docstring
        say("bench train: the actor's steps alternate with a transformers step on rank 0", flush=True)
        hf_step = _hf_step(hf_cfg, batch, args) if rank == 0 else None
        out["megatron"], base = _interleaved(lambda: actor.update(batch), hf_step, args, say)
        if rank == 0:
            out["baseline"] = base
            out["baseline_flops"] = flops.batch_flops(cfg, batch, vocab=cfg.vocab_size)
    peak = _peak(args)
    step_flops = flops.batch_flops(cfg, batch, vocab=actor.module.padded_vocab_size, recompute=args.recompute)
    out.update(peak=peak, flops=step_flops, tokens=int(batch["attention_mask"].sum()), world=world,
               params_per_rank=sum(p.numel() for p in actor.module.parameters()))
    del actor
    if not (alternate or args.no_baseline):
        _sync()
        if rank == 0:
            say("bench train: transformers baseline on rank 0 (the other ranks wait)", flush=True)
            out["baseline"] = _interleaved(None, _hf_step(hf_cfg, batch, args), args, say)[1]
            out["baseline_flops"] = flops.batch_flops(cfg, batch, vocab=cfg.vocab_size)
        _sync()
    return out


def _interleaved(actor_step, hf_step, args, say):
    """Median wall times of the actor's step (on every rank; None: not run) and of the baseline's (where
    given), one after the other in each round, after ``--warmup`` untimed rounds."""
    import statistics
    import time

    times = {"megatron": [], "transformers": []}
    sync_hf = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for i in range(args.warmup + args.iters):
        for name, step, sync in (("megatron", actor_step, _sync), ("transformers", hf_step, sync_hf)):
            if step is not None:
                sync()
                t0 = time.perf_counter()
                step()
                sync()
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - t0)
                    say(f"  {name}: iter {i + 1 - args.warmup}/{args.iters} {times[name][-1]:.3f} s", flush=True)
            if actor_step is not None and name == "transformers":
                _sync()  # the other ranks wait here while rank 0 runs the baseline
    return tuple({"median_s": statistics.median(t), "times_s": t} if t else None for t in times.values())


def _hf_step(hf_cfg, batch, args):
    """One step of the baseline as a function: transformers model, plain PyTorch step: forward, log-probs,
    policy_loss, backward, gradient clip, AdamW."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from dualrpo_mcore.algo import policy_loss
    from dualrpo_mcore.models.qwen2_5_vl import presets

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if (args.precision or ("bf16" if device == "cuda" else "fp32")) == "bf16" else torch.float32
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration._from_config(hf_cfg, attn_implementation="sdpa", dtype=dtype)
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)
    dev = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    image = presets.TINY_IMAGE if args.model == "tiny" else model.config.image_token_id
    fwd_kw = dict(input_ids=dev["input_ids"], attention_mask=dev["attention_mask"],
                  mm_token_type_ids=(dev["input_ids"] == image).int())
    if "pixel_values" in dev:
        fwd_kw.update(pixel_values=dev["pixel_values"].to(dtype), image_grid_thw=dev["image_grid_thw"])

    def step():
        opt.zero_grad(set_to_none=True)
        logits = model(**fwd_kw).logits[:, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, dev["input_ids"][:, 1:, None])[..., 0]
        mask = dev["response_mask"][:, 1:].float()
        loss, _ = policy_loss(lp, dev["old_logprob"][:, 1:], dev["advantages"], mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return step


def summarize(res: Dict[str, Any]) -> Dict[str, Any]:
    """Per-device rows (tokens/s, TFLOP/s, MFU, HFU) of the actor and the baseline, and their ratio."""
    peak = res["peak"]["flops"]
    rows = []
    world, tokens = res["world"], res["tokens"]
    actor_name = "megatron actor (packed)" if "megatron_padded" in res else "megatron actor"
    for name, key, flops_key, devices in ((actor_name, "megatron", "flops", world),
                                          ("megatron actor (padded)", "megatron_padded", "flops", world),
                                          ("hf-sdpa-adamw (baseline)", "baseline", "baseline_flops", 1)):
        if key not in res:
            continue
        t = res[key]["median_s"]
        f = res[flops_key]
        rows.append(dict(method=name, devices=devices, step_s=t, tokens_per_s_per_device=tokens / t / devices,
                         tflops_per_device=f["model"] / t / devices / 1e12, mfu=f["model"] / t / devices / peak,
                         hfu=f["hardware"] / t / devices / peak))
    if "baseline" in res:
        for r in rows[:-1]:
            r["speedup_vs_baseline"] = r["tokens_per_s_per_device"] / rows[-1]["tokens_per_s_per_device"]
    out = dict(rows=rows, peak_tflops_per_device=peak / 1e12, peak_source=res["peak"]["source"], tokens=tokens,
               step_model_tflop=res["flops"]["model"] / 1e12)
    if "layouts" in res:
        from . import packing_compare

        out["packing"] = packing_compare.summarize(res)
    return out


def print_table(summary: Dict[str, Any], args) -> None:
    print(f"\ntrain step  model={args.model} tp={args.tp} pp={args.pp} rows={args.rows} "
          f"tokens/step={summary['tokens']} model TFLOP/step={summary['step_model_tflop']:.4g}")
    print(f"peak/device {summary['peak_tflops_per_device']:.4g} TFLOP/s ({summary['peak_source']})")
    print(f"{'method':<27}{'dev':>4}{'step s':>9}{'tok/s/dev':>11}{'TFLOP/s/dev':>13}{'MFU %':>8}{'HFU %':>8}"
          f"{'vs baseline':>13}")
    for r in summary["rows"]:
        ratio = f"{r['speedup_vs_baseline']:.2f}x" if "speedup_vs_baseline" in r else "1.00x" if "baseline" in \
            r["method"] else "-"
        print(f"{r['method']:<27}{r['devices']:>4}{r['step_s']:>9.3f}{r['tokens_per_s_per_device']:>11.1f}"
              f"{r['tflops_per_device']:>13.4g}{100 * r['mfu']:>8.2f}{100 * r['hfu']:>8.2f}{ratio:>13}")
    print("vs baseline: tokens/s per device of the actor / of the transformers step (> 1 = actor faster)")
    if "packing" in summary:
        from . import packing_compare
        from .length_mix import describe

        packing_compare.print_table(summary["packing"], describe(summary["response_lengths"]))


def run(args) -> int:
    import warnings

    from dualrpo_mcore.parallel.spawn import run_distributed

    from .common import public_args, write_json

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        check_args(args)
    except ValueError as e:
        print(f"dualrpo bench train: {e}")
        return 2
    clean = argparse.Namespace(**public_args(args))
    world = args.tp * args.pp
    if "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun: this process is one rank
        res = _worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), clean)
        if int(os.environ["RANK"]) != 0:
            return 0
    else:
        if torch.cuda.is_available() and world > torch.cuda.device_count():
            print(f"dualrpo bench train: --tp x --pp = {world} exceeds the {torch.cuda.device_count()} GPUs here")
            return 2
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        threads = max(1, (os.cpu_count() or 1) // world)
        res = run_distributed(_worker, world, clean, backend=backend, threads=threads, timeout=3600)[0]
    summary = summarize(res)
    summary["response_lengths"] = res["response_lengths"]
    print_table(summary, args)
    bad = [k for r in summary["rows"] for k in ("step_s", "mfu") if not (math.isfinite(r[k]) and r[k] > 0)]
    if args.json:
        write_json(args.json, "train", args, dict(summary=summary, raw=res))
    return 1 if bad else 0
