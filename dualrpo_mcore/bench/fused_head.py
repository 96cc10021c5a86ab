"""``dualrpo bench token-stats --fused-head``: the fused output layer against the unfused one.

Both methods compute per-token log-prob, entropy and self-certainty of ``hidden [T, H]`` against an
output weight ``[V, H]`` (one TP rank holding the whole vocabulary) and run backward with all three
outputs weighted by 1, producing d hidden and d weight:

* ``unfused``  the output-layer GEMM (``hidden @ weight.T``, as Megatron's ColumnParallelLinear) and
  today's ``ops.token_stats`` on the stored logits;
* ``fused``    ``ops.fused_head`` (four GEMMs: its backward recomputes each chunk's logits);
* ``fused-loss`` ``ops.fused_head_loss`` with the same loss (the sum of the three statistics; three
  GEMMs). How the two work, and which the actor runs where: docs/fused_head.md.

Measured in one run, for each T: forward+backward time (the actor's update), forward-only time
under ``no_grad`` (the log-prob passes), and peak extra memory during forward+backward beyond the
inputs (CPU: the profiler's allocator events; CUDA: ``max_memory_allocated``). ``head extra`` is the
peak minus d hidden and d weight, which both methods must produce and the caller keeps.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any, Dict, List

import torch

from .common import profiler_peak_bytes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fused-head", action="store_true",
                        help="benchmark ops.fused_head against output-layer GEMM + token_stats instead")
    parser.add_argument("--head-tokens", type=int, nargs="+", default=None,
                        help="--fused-head: T values (default 2048 4096 on CPU, 4096 16384 65536 on CUDA)")
    parser.add_argument("--head-vocab", type=int, default=151936, help="--fused-head: V")
    parser.add_argument("--head-hidden", type=int, default=2048, help="--fused-head: H")
    parser.add_argument("--chunk-mb", type=float, default=None,
                        help="--fused-head: the op's chunk budget in MiB (default: the op's own, ops.fused_head)")


def _unfused(h, w, y, backend, chunk_bytes):
    from dualrpo_mcore.ops import token_stats

    return tuple(token_stats(h @ w.t(), y, backend=backend))


def _fused(h, w, y, backend, chunk_bytes):
    from dualrpo_mcore.ops import fused_head

    return tuple(fused_head(h, w, y, backend=backend, chunk_bytes=chunk_bytes))


def _fused_loss(h, w, y, backend, chunk_bytes):
    from dualrpo_mcore.ops import fused_head_loss

    def loss_fn(ts):
        return ts.logprob.sum() + ts.entropy.sum() + ts.self_certainty.sum(), None
    return fused_head_loss(h, w, y, loss_fn, backend=backend, chunk_bytes=chunk_bytes)[0]


METHODS = {"unfused": _unfused, "fused": _fused, "fused-loss": _fused_loss}
FUSED = ("fused", "fused-loss")


def _fwd_bwd(method, h0, w0, y, backend, chunk_bytes):
    """Backward of the sum of the three statistics (all weighted by 1), whichever way it is formed."""
    h, w = h0.detach().requires_grad_(True), w0.detach().requires_grad_(True)
    outs = method(h, w, y, backend, chunk_bytes)
    if torch.is_tensor(outs):
        outs.backward()
    else:
        torch.autograd.backward(list(outs), [torch.ones_like(o) for o in outs])
    return h.grad, w.grad


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _measure_fwd_bwd(method, h, w, y, backend, chunk_bytes):
    """(wall seconds, process CPU seconds, peak extra bytes) of one forward+backward, one run."""
    if h.device.type == "cuda":
        _sync(h.device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0, c0 = time.perf_counter(), time.process_time()
        grads = _fwd_bwd(method, h, w, y, backend, chunk_bytes)
        _sync(h.device)
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
        del grads
        return secs, cpu, torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    # The allocator events cost little here: the large tensors are few.
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        t0, c0 = time.perf_counter(), time.process_time()
        grads = _fwd_bwd(method, h, w, y, backend, chunk_bytes)
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
        del grads
    return secs, cpu, profiler_peak_bytes(prof)


def _time_forward(method, h, w, y, backend, chunk_bytes):
    """(wall, process CPU) seconds of a forward under no_grad."""
    with torch.no_grad():
        _sync(h.device)
        t0, c0 = time.perf_counter(), time.process_time()
        method(h, w, y, backend, chunk_bytes)
        _sync(h.device)
        return time.perf_counter() - t0, time.process_time() - c0


def run(args) -> List[Dict[str, Any]]:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    tokens = args.head_tokens or ([2048, 4096] if device.type == "cpu" else [4096, 16384, 65536])
    from dualrpo_mcore.ops.fused_head import DEFAULT_CHUNK_BYTES

    chunk_bytes = DEFAULT_CHUNK_BYTES if args.chunk_mb is None else int(args.chunk_mb * 2**20)
    v, hdim = args.head_vocab, args.head_hidden
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(v, hdim, generator=gen) / math.sqrt(hdim)).to(device=device, dtype=dtype)
    for name, method in METHODS.items():  # warm-up at a small T: lazy initialisation, first-touch pages
        _fwd_bwd(method, w[:64].clone(), w, torch.zeros(64, dtype=torch.long, device=device), args.backend,
                 chunk_bytes)
    results = []
    for t in tokens:
        h = torch.randn(t, hdim, generator=gen).to(device=device, dtype=dtype)
        y = torch.randint(0, v, (t,), generator=gen).to(device)
        grads_bytes = (t * hdim + v * hdim) * h.element_size()
        for name, method in METHODS.items():
            best, cpu, peak = math.inf, math.inf, 0
            for _ in range(args.repeats):
                secs, c, p = _measure_fwd_bwd(method, h, w, y, args.backend, chunk_bytes)
                best, cpu, peak = min(best, secs), min(cpu, c), max(peak, p)
            fwd, fwd_cpu = math.nan, math.nan  # fused-loss has no forward-only use (the passes run fused)
            if name != "fused-loss":
                fwd, fwd_cpu = min(_time_forward(method, h, w, y, args.backend, chunk_bytes)
                                   for _ in range(args.repeats))
            results.append({"T": t, "V": v, "H": hdim, "dtype": str(dtype).split(".")[-1], "method": name,
                            "fwd_bwd_s": best, "fwd_only_s": fwd, "fwd_bwd_cpu_s": cpu, "fwd_only_cpu_s": fwd_cpu,
                            "peak_extra_bytes": peak,
                            "grads_bytes": grads_bytes, "head_extra_bytes": peak - grads_bytes,
                            "chunk_bytes": chunk_bytes if name in FUSED else None})
            print(f"  T {t} {name}: fwd+bwd {best:.2f} s (CPU {cpu:.2f} s), fwd {fwd:.2f} s (CPU {fwd_cpu:.2f} s), "
                  f"peak extra {peak / 2**20:.0f} MiB",
                  file=sys.stderr, flush=True)
        del h, y
    return results


def ratios(results: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """fused / unfused and fused-loss / unfused per T (< 1 = smaller or faster than unfused)."""
    out = []
    for t, name in [(t, n) for t in sorted({r["T"] for r in results}) for n in FUSED]:
        by = {r["method"]: r for r in results if r["T"] == t}
        if name not in by:
            continue
        f, u = by[name], by["unfused"]
        out.append({"T": t, "method": name, "time_fwd_bwd": f["fwd_bwd_s"] / u["fwd_bwd_s"],
                    "time_fwd_only": f["fwd_only_s"] / u["fwd_only_s"],
                    "cpu_time_fwd_bwd": f["fwd_bwd_cpu_s"] / u["fwd_bwd_cpu_s"],
                    "cpu_time_fwd_only": f["fwd_only_cpu_s"] / u["fwd_only_cpu_s"],
                    "peak_extra": f["peak_extra_bytes"] / u["peak_extra_bytes"],
                    "head_extra": f["head_extra_bytes"] / max(1, u["head_extra_bytes"])})
    return out


def print_table(results: List[Dict[str, Any]]) -> None:
    mib = 2**20
    print(f"{'T':>6} {'method':>10} {'fwd+bwd s':>10} {'(CPU s)':>8} {'fwd s':>7} {'(CPU s)':>8} "
          f"{'peak extra MiB':>15} {'head extra MiB':>15}")
    for r in results:
        print(f"{r['T']:>6} {r['method']:>10} {r['fwd_bwd_s']:>10.2f} {r['fwd_bwd_cpu_s']:>8.2f} {r['fwd_only_s']:>7.2f} "
              f"{r['fwd_only_cpu_s']:>8.2f} {r['peak_extra_bytes'] / mib:>15.0f} {r['head_extra_bytes'] / mib:>15.0f}")
    print(f"\n{'T':>6} {'method':>10} {'wall fwd+bwd':>13} {'CPU fwd+bwd':>12} {'wall fwd':>9} {'CPU fwd':>8} {'peak extra':>11} "
          f"{'head extra':>11}   (fused / unfused)")
    for q in ratios(results):
        print(f"{q['T']:>6} {q['method']:>10} {q['time_fwd_bwd']:>12.2f}x {q['cpu_time_fwd_bwd']:>11.2f}x {q['time_fwd_only']:>8.2f}x "
              f"{q['cpu_time_fwd_only']:>7.2f}x {q['peak_extra']:>10.3f}x {q['head_extra']:>10.3f}x")
    print("CPU = process CPU time (steadier than wall time on a shared machine). "
          "head extra = peak extra minus d hidden and d weight (both methods return them). Goals: head extra "
          "<= 0.125x at the largest T; time <= 1.1x on the CPU. fused backward recomputes the logits "
          "(4 GEMMs against 3); fused-loss (the actor's update) forms the gradients in the forward (3).")
