"""``dualrpo bench token-stats``: fused token statistics against two baselines, same run.

Each method computes per-token log-prob, entropy and self-certainty of a logits shard and runs
backward with all three outputs weighted by 1:

* ``fused``     ``dualrpo_mcore.ops.token_stats`` (compiled kernel; ``--backend torch`` = fallback)
* ``naive`` (a) fp32 upcast, log_softmax, gather, a separate entropy pass, logsumexp - mean
* ``mcore`` (b) Megatron-Core ``vocab_parallel_cross_entropy`` plus a separate vocab-parallel
  entropy/self-certainty pass (autograd-aware all-reduces over the TP group). Megatron's function
  rewrites its input in place, so it gets its own copy of the logits (counted in its memory).

CPU: wall time of forward+backward (best of ``--repeats``) and peak extra memory (allocator
events of the torch profiler, a separate untimed run; the logits gradient is reported apart).
GPU (``--device cuda``): forward and backward time with CUDA events, achieved GB/s of the fused
kernel against a copy-bandwidth measurement taken in the same run, for V split over TP = 1, 2,
4, 8 (one rank's shard, TP group of one process: the kernel work per rank is what scales).

``--fused-head``: the output layer fused with the statistics (``ops.fused_head``) against the output
GEMM + ``token_stats``, at V = 151936, H = 2048 (``bench/fused_head.py``).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

from . import common


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tokens", type=int, default=None, help="T (default 4096 CPU, 16384 GPU)")
    parser.add_argument("--vocab", type=int, nargs="+", default=None,
                        help="CPU: V_local values (default 32768 76032); GPU: global V (default 152064)")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4, 8], help="GPU: TP splits of V")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="logits dtype (default float32 on CPU, bfloat16 on GPU)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", default="ext", choices=["ext", "torch"], help="fused backend")
    parser.add_argument("--skip", nargs="*", default=[], choices=["naive", "mcore"], help="baselines to skip")
    parser.add_argument("--json", default=None, help="write results here as JSON")
    from . import fused_head

    fused_head.add_arguments(parser)


# --- the three methods: each returns (logprob, entropy, self_certainty) ------------------------

def fused(x, y, ctx):
    from dualrpo_mcore.ops import token_stats

    return tuple(token_stats(x, y, backend=ctx["backend"]))


def naive(x, y, ctx):
    xf = x.float()
    lp_all = torch.log_softmax(xf, dim=-1)
    lp = lp_all.gather(1, y[:, None])[:, 0]
    p = lp_all.exp()
    entropy = -(p * lp_all).sum(-1)
    sc = torch.logsumexp(xf, dim=-1) - xf.mean(-1) - math.log(x.shape[-1])
    return lp, entropy, sc


def mcore(x, y, ctx):
    import torch.distributed.nn.functional as dnn

    group = ctx["group"]
    loss = ctx["ce"](x.float().clone() if x.dtype == torch.float32 else x.float(), y)
    xf = x.float()
    m = xf.detach().amax(-1, keepdim=True)
    torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX, group=group)
    e = torch.exp(xf - m)
    s = dnn.all_reduce(e.sum(-1), group=group)
    px = dnn.all_reduce((e * xf).sum(-1), group=group) / s
    lse = torch.log(s) + m[:, 0]
    entropy = lse - px
    sc = lse - dnn.all_reduce(xf.sum(-1), group=group) / x.shape[-1] - math.log(x.shape[-1])
    return -loss, entropy, sc


def _megatron_ce():
    """Megatron's TP state for one process (gloo on CPU); (vocab_parallel_cross_entropy, group)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from dualrpo_mcore.parallel import setup
    from dualrpo_mcore.parallel.spawn import free_port

    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
    if not ps.model_parallel_is_initialized():
        setup.initialize(tp=1, backend="nccl" if torch.cuda.is_available() else "gloo")
    return vocab_parallel_cross_entropy, ps.get_tensor_model_parallel_group()


# --- measurement --------------------------------------------------------------------------------

def _fwd_bwd(method, z, y, ctx):
    x = z.detach().requires_grad_(True)
    outs = method(x, y, ctx)
    torch.autograd.backward(list(outs), [torch.ones_like(o) for o in outs])
    return x.grad


def _time_cpu(method, z, y, ctx, repeats):
    _fwd_bwd(method, z, y, ctx)  # warm-up (first-touch pages, lazy init)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        _fwd_bwd(method, z, y, ctx)
        best = min(best, time.perf_counter() - t0)
    return best


def _peak_extra_cpu(method, z, y, ctx):
    """Peak bytes allocated during fwd+bwd beyond the inputs, from the profiler's allocator events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _fwd_bwd(method, z, y, ctx)
    return common.profiler_peak_bytes(prof)


def _time_cuda(fn, repeats):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = math.inf
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best


def _methods(args):
    return {name: fn for name, fn in (("fused", fused), ("naive", naive), ("mcore", mcore)) if name not in args.skip}


def run_cpu(args, ctx):
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or "float32")
    rows, results = args.tokens or 4096, []
    for v in args.vocab or [32768, 76032]:
        gen = torch.Generator().manual_seed(0)
        z = (torch.randn(rows, v, generator=gen) * 2).to(dtype)
        y = torch.randint(0, v, (rows,), generator=gen)
        grad_bytes = z.numel() * z.element_size()
        for name, method in _methods(args).items():
            t = _time_cpu(method, z, y, ctx, args.repeats)
            peak = _peak_extra_cpu(method, z, y, ctx)
            print(f"  V_local {v} {name}: {t:.3f} s", file=sys.stderr, flush=True)  # progress: cases take seconds
            results.append({"T": rows, "V_local": v, "dtype": str(dtype).split(".")[-1], "method": name,
                            "fwd_bwd_s": t, "peak_extra_bytes": peak,
                            "peak_extra_per_token_excl_grad": (peak - grad_bytes) / rows})
    return results


def run_cuda(args, ctx):
    from dualrpo_mcore.ops import token_stats

    dtype = getattr(torch, args.dtype or "bfloat16")
    rows, vocab, results = args.tokens or 16384, (args.vocab or [152064])[0], []
    for tp in args.tp:
        v = vocab // tp
        z = (torch.randn(rows, v, device="cuda") * 2).to(dtype)
        y = torch.randint(0, v, (rows,), device="cuda")
        nbytes = z.numel() * z.element_size()
        dst = torch.empty_like(z)
        copy_s = _time_cuda(lambda: dst.copy_(z), args.repeats)
        copy_gbs = 2 * nbytes / copy_s / 1e9
        x = z.detach().requires_grad_(True)
        fwd_s = _time_cuda(lambda: token_stats(x, y, backend=args.backend), args.repeats)
        out = token_stats(x, y, backend=args.backend)
        ones = [torch.ones_like(o) for o in out]
        bwd_s = _time_cuda(lambda: torch.autograd.grad(list(out), [x], ones, retain_graph=True), args.repeats)
        row = {"T": rows, "V": vocab, "TP": tp, "V_local": v, "dtype": str(dtype).split(".")[-1],
               "copy_GBps": copy_gbs, "fwd_s": fwd_s, "bwd_s": bwd_s,
               "fwd_GBps": nbytes / fwd_s / 1e9, "bwd_GBps": 2 * nbytes / bwd_s / 1e9}
        row["fwd_pct_copy"] = 100 * row["fwd_GBps"] / copy_gbs
        row["bwd_pct_copy"] = 100 * row["bwd_GBps"] / copy_gbs
        for name, method in _methods(args).items():
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            row[f"{name}_fwd_bwd_s"] = _time_cuda(lambda m=method: _fwd_bwd(m, z, y, ctx), args.repeats)
            row[f"{name}_peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
        results.append(row)
        print(f"  TP {tp} V_local {v}: fwd {fwd_s * 1e3:.2f} ms, bwd {bwd_s * 1e3:.2f} ms", file=sys.stderr, flush=True)
        del z, dst, x, out
    return results


# --- report -----------------------------------------------------------------------------------

def _print_cpu(results):
    print(f"{'V_local':>8} {'method':>7} {'fwd+bwd s':>10} {'vs fused':>9} {'peak extra MiB':>15} "
          f"{'B/token excl. grad':>19}")
    for v in sorted({r["V_local"] for r in results}):
        rows = [r for r in results if r["V_local"] == v]
        base = next(r for r in rows if r["method"] == "fused")
        for r in rows:
            print(f"{v:>8} {r['method']:>7} {r['fwd_bwd_s']:>10.3f} {r['fwd_bwd_s'] / base['fwd_bwd_s']:>8.2f}x "
                  f"{r['peak_extra_bytes'] / 2**20:>15.1f} {r['peak_extra_per_token_excl_grad']:>19.1f}")
    print("vs fused: time of the method / time of fused (>1 = fused is faster); "
          "B/token excl. grad: (peak extra - logits gradient) / T")


def _print_cuda(results):
    print(f"{'TP':>3} {'V_local':>8} {'copy GB/s':>10} {'fwd GB/s':>9} {'fwd %':>6} {'bwd GB/s':>9} "
          f"{'bwd %':>6} {'naive/fused':>12} {'mcore/fused':>12}")
    for r in results:
        fused_t = r["fused_fwd_bwd_s"]
        ratio = {k: (f"{r[k + '_fwd_bwd_s'] / fused_t:.2f}x" if k + "_fwd_bwd_s" in r else "-")
                 for k in ("naive", "mcore")}
        print(f"{r['TP']:>3} {r['V_local']:>8} {r['copy_GBps']:>10.0f} {r['fwd_GBps']:>9.0f} "
              f"{r['fwd_pct_copy']:>5.0f}% {r['bwd_GBps']:>9.0f} {r['bwd_pct_copy']:>5.0f}% "
              f"{ratio['naive']:>12} {ratio['mcore']:>12}")
    print("GB/s: bytes of logits read (fwd) / read+written (bwd) per second; % of the copy bandwidth "
          "(read+write of the same tensor) measured in this run")


def run(args) -> int:
    import warnings

    from dualrpo_mcore.ops import load_error, load_extension

    # Megatron and torch.distributed.nn deprecation notices would drown the table.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")

    if args.backend == "ext" and load_extension() is None:
        print(f"compiled kernel not available ({load_error()}); use --backend torch or rebuild")
        return 1
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here")
        return 1
    if args.fused_head:
        return _run_fused_head(args)
    ctx = {"backend": args.backend}
    if "mcore" not in args.skip:
        ctx["ce"], ctx["group"] = _megatron_ce()
    machine = common.machine()  # before the run: the load at start
    results = run_cpu(args, ctx) if args.device == "cpu" else run_cuda(args, ctx)
    (_print_cpu if args.device == "cpu" else _print_cuda)(results)
    if args.json:
        common.write_json(args.json, "token-stats", args, results, machine=machine)
    return 0


def _run_fused_head(args) -> int:
    """``--fused-head``: ``bench/fused_head.py``; the JSON carries the ratios and the versions."""
    import numpy

    from . import fused_head
    from dualrpo_mcore.ops import load_extension

    results = fused_head.run(args)
    fused_head.print_table(results)
    if args.json:
        ext = load_extension()
        versions = {"torch": torch.__version__, "numpy": numpy.__version__,
                    "extension": ext.build_info() if ext is not None else None}
        try:
            from importlib.metadata import version

            versions["megatron-core"] = version("megatron-core")
        except Exception:  # noqa: BLE001 - not needed by this benchmark, only reported
            versions["megatron-core"] = None
        common.write_json(args.json, "token-stats --fused-head", args, results,
                          ratios=fused_head.ratios(results), versions=versions)
    return 0
