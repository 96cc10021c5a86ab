"""``dualrpo bench rollout``: rollout throughput (generated tokens/s, samples/s) of the engines.

Workload: ``--prompts`` synthetic prompts (text + ``--images-per-prompt`` images of ``--image``
patches, as ``bench train`` builds them), ``--n`` samples each, exactly ``--max-new-tokens`` tokens per
sample (EOS is disabled in every method so all generate the same number of tokens), temperature 1,
no top-k/top-p. Methods, same run, same model weights:

* ``hf-engine``          ``rollout.hf_engine.HFEngine`` (prefill once per prompt, KV cache copied per
  sample, batch-1 decode: deterministic per-sample seeds, independent of batch composition)
* ``generate`` (baseline) transformers' ``model.generate`` per prompt with ``num_return_sequences=n``
  (one batched prefill of the n copies, batched decode of the n samples)
* ``sglang``             ``rollout.sglang_engine.SGLangEngine`` (GPU, needs the ``sglang`` extra and
  ``--model-dir``: an HF checkpoint directory with tokenizer and processor, since SGLang runs its own
  image processor on raw images); skipped with the reason otherwise

Reported: median wall time over ``--iters`` after ``--warmup``, generated tokens/s, samples/s, and
each method's tokens/s over the ``generate`` baseline's (> 1 = faster than the baseline).
"""
from __future__ import annotations

import argparse
import math
from typing import Any, Dict, List

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .train import SMALL_MODELS

    parser.add_argument("--model", default="tiny", choices=SMALL_MODELS, help="model shape (random weights)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per call")
    parser.add_argument("--n", type=int, default=4, help="samples per prompt (G)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per sample")
    parser.add_argument("--prompt-len", type=int, default=32, help="text tokens per prompt")
    parser.add_argument("--image", default="8x8", help="image grid HxW in patches")
    parser.add_argument("--images-per-prompt", type=int, default=1, help="images per prompt (0 = text only)")
    parser.add_argument("--iters", type=int, default=3, help="timed calls (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first")
    parser.add_argument("--model-dir", default=None, help="HF checkpoint dir for SGLang (GPU only)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--json", default=None, help="write results here as JSON")


def check_args(args) -> None:
    from .train import parse_grid

    for name in ("prompts", "n", "max_new_tokens", "prompt_len", "iters"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or args.images_per_prompt < 0:
        raise ValueError("--warmup and --images-per-prompt must be >= 0")
    parse_grid(args.image)


def requests_for(cfg, args):
    """Synthetic prompts as ``RolloutRequest``s (one image set per prompt)."""
    from dualrpo_mcore.rollout.engine import RolloutRequest

    from .train import parse_grid, synthetic_batch

    grid = parse_grid(args.image)
    b = synthetic_batch(cfg, args.prompts, args.prompt_len, 1, grid, args.images_per_prompt, seed=1)
    per = args.images_per_prompt * grid[0] * grid[1]
    out = []
    for i in range(args.prompts):
        ids = b["input_ids"][i, :-1].tolist()  # drop the 1-token "response"
        pv = b["pixel_values"][i * per:(i + 1) * per] if per else None
        grids = b["image_grid_thw"][i * args.images_per_prompt:(i + 1) * args.images_per_prompt] if per else None
        out.append(RolloutRequest(input_ids=ids, pixel_values=pv, image_grid_thw=grids, uid=f"p{i}"))
    return out


def _engine_call(engine, requests, args):
    """The timed call of an engine (``--n`` samples per request, T = 1); returns the tokens generated."""
    from dualrpo_mcore.rollout.engine import SamplingParams

    params = SamplingParams(n=args.n, temperature=1.0, max_new_tokens=args.max_new_tokens, seed=0)

    def call():
        out = engine.generate(requests, params)
        return sum(len(s.token_ids) for row in out for s in row)

    call.engine = engine
    return call


def _generate_method(model, requests, args, device):
    image = model.config.image_token_id

    def call():
        total = 0
        for r in requests:
            ids = torch.tensor([r.input_ids], device=device)
            kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=(ids == image).int())
            if r.pixel_values is not None:
                kw.update(pixel_values=r.pixel_values.to(device, model.dtype), image_grid_thw=r.image_grid_thw.to(device))
            out = model.generate(**kw, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                                 num_return_sequences=args.n)
            total += (out.shape[1] - ids.shape[1]) * out.shape[0]
        return total

    return call


def _sglang_method(requests, args, cfg) -> Any:
    """The SGLang engine, or a string saying why it is skipped."""
    if not torch.cuda.is_available():
        return "no CUDA device (SGLang is GPU-only)"
    try:
        import sglang  # noqa: F401
    except ImportError:
        return "sglang not installed (pip install dualrpo-mcore[sglang])"
    if not args.model_dir:
        return "--model-dir not given (SGLang needs an HF checkpoint dir with tokenizer and processor)"
    from PIL import Image

    from dualrpo_mcore.rollout.engine import RolloutRequest
    from dualrpo_mcore.rollout.sglang_engine import SGLangEngine

    from .train import parse_grid

    h, w = parse_grid(args.image)
    px = cfg.patch_size
    g = torch.Generator().manual_seed(0)
    raw = [[Image.fromarray(torch.randint(0, 256, (h * px, w * px, 3), generator=g, dtype=torch.uint8).numpy())
            for _ in range(args.images_per_prompt)] for _ in requests]
    reqs = [RolloutRequest(input_ids=r.input_ids, images=imgs, uid=r.uid) for r, imgs in zip(requests, raw)]
    # SamplingParams has no ignore-EOS switch: SGLang samples may stop early; tokens are counted as produced.
    return _engine_call(SGLangEngine(args.model_dir, image_token_id=cfg.image_token_id), reqs, args)


def _model(args, device):
    """transformers model of ``--model`` (random weights) or of ``--model-dir`` (its weights)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from .train import hf_config

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.model_dir:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.model_dir, dtype=dtype)
    else:
        torch.manual_seed(0)
        model = Qwen2_5_VLForConditionalGeneration._from_config(hf_config(args.model), dtype=dtype)
    return model.to(device).eval()


def measure(call, args, name: str) -> Dict[str, Any]:
    """Median wall time of ``call`` (returns generated tokens) and the throughputs it implies."""
    import time

    tokens: List[int] = []
    times: List[float] = []
    with torch.no_grad():
        for i in range(args.warmup + args.iters):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            n = call()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
                tokens.append(n)
            print(f"  {name}: {'warm-up' if i < args.warmup else 'iter'} {i + 1}/{args.warmup + args.iters} "
                  f"{time.perf_counter() - t0:.3f} s, {n} tokens", flush=True)
    order = sorted(range(len(times)), key=times.__getitem__)
    mid = order[len(order) // 2]
    t, n = times[mid], tokens[mid]
    samples = args.prompts * args.n
    return dict(method=name, median_s=t, times_s=times, tokens=n, tokens_per_s=n / t, samples_per_s=samples / t)


def run(args) -> int:
    import warnings

    from dualrpo_mcore.models.qwen2_5_vl import from_hf
    from dualrpo_mcore.rollout.hf_engine import HFEngine

    from .common import write_json

    warnings.filterwarnings("ignore", category=UserWarning)
    try:
        check_args(args)
    except ValueError as e:
        print(f"dualrpo bench rollout: {e}")
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = _model(args, device)
    cfg = from_hf(model.config)
    requests = requests_for(cfg, args)
    print(f"bench rollout: {args.prompts} prompts x n={args.n} x {args.max_new_tokens} tokens on {device}", flush=True)
    rows = [measure(_generate_method(model, requests, args, device), args, "generate (baseline)"),
            # no EOS: every sample runs to the cap
            measure(_engine_call(HFEngine(model, eos_token_ids=[], device=device), requests, args), args, "hf-engine")]
    skipped: Dict[str, str] = {}
    sg = _sglang_method(requests, args, cfg)
    if isinstance(sg, str):
        skipped["sglang"] = sg
    else:
        try:
            rows.append(measure(sg, args, "sglang"))
        finally:
            sg.engine.shutdown()
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["vs_generate"] = r["tokens_per_s"] / base
    _print(rows, skipped, args)
    if args.json:
        write_json(args.json, "rollout", args, dict(rows=rows, skipped=skipped, device=device))
    return 0 if all(math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0 for r in rows) else 1


def _print(rows, skipped, args) -> None:
    print(f"\nrollout  model={args.model_dir or args.model} prompts={args.prompts} n={args.n} "
          f"max_new_tokens={args.max_new_tokens} image={args.image}x{args.images_per_prompt}")
    print(f"{'method':<22}{'median s':>10}{'tokens':>8}{'tokens/s':>10}{'samples/s':>11}{'vs generate':>13}")
    for r in rows:
        print(f"{r['method']:<22}{r['median_s']:>10.3f}{r['tokens']:>8}{r['tokens_per_s']:>10.1f}"
              f"{r['samples_per_s']:>11.2f}{r['vs_generate']:>12.2f}x")
    for name, why in skipped.items():
        print(f"{name:<22}skipped: {why}")
    print("vs generate: generated tokens/s over transformers' model.generate on the same prompts (> 1 = faster)")
