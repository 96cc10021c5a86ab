"""Shared pieces of the benchmarks: run metadata (machine, torch, commit, date, command line), the
JSON writer, device peak FLOP/s, the CPU profiler's peak memory, and a median timer.

Every result file carries enough to reproduce and compare it: the exact command, the resolved
arguments, the commit, the CPU/GPU model and the load at start (CPU numbers on a shared machine
are only comparable within one run, which is why each benchmark measures its baselines itself).
"""
from __future__ import annotations

import contextlib
import datetime
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import torch

from dualrpo_mcore.atomic import atomic_write_json

# Dense (no sparsity) tensor-core peak per GPU, FLOP/s, by dtype; matched on the device name.
GPU_PEAKS = (
    ("H200", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),  # SXM; the PCIe card is lower (756)
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
)


def commit() -> Optional[str]:
    """HEAD of the checkout this package runs from (None outside git)."""
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine() -> Dict[str, Any]:
    """CPU model, core count, load, torch version, and the GPU when CUDA is present."""
    info: Dict[str, Any] = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                            "python": platform.python_version()}
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
        info["loadavg_at_start"] = list(os.getloadavg())
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpus"] = torch.cuda.device_count()
        info["cuda"] = torch.version.cuda
    return info


def command_line() -> str:
    """The command as typed (``dualrpo ...`` or ``python -m dualrpo_mcore ...``)."""
    prog = os.path.basename(sys.argv[0]) if sys.argv else "dualrpo"
    if prog in ("__main__.py", "-m"):
        prog = "python -m dualrpo_mcore"
    return " ".join([prog] + [shlex.quote(a) for a in sys.argv[1:]])


def public_args(args) -> Dict[str, Any]:
    """argparse namespace without the dispatcher's private entries."""
    return {k: v for k, v in vars(args).items() if not k.startswith("_")}


def write_json(path: str, bench: str, args, results: Any, **extra: Any) -> Dict[str, Any]:
    """Write one benchmark document; returns it. ``extra`` entries are added, and replace the
    default ones of the same name (e.g. a ``machine`` taken before the run, with the load at start)."""
    doc = {"bench": bench, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "commit": commit(),
           "command": command_line(), "machine": machine(), "args": public_args(args), **extra,
           "results": results}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_json(path, doc, indent=2, default=str)  # a reader never sees half a file
    print(f"wrote {path}")
    return doc


def gpu_peak(dtype: str) -> Optional[Dict[str, Any]]:
    """Table peak of this GPU for ``dtype`` ('bf16', 'fp16', 'fp32'), or None if unknown / no CUDA."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peaks in GPU_PEAKS:
        if key in name.upper():
            return {"flops": peaks[dtype], "source": f"table: {key} dense {dtype}", "device": name}
    return None


def measured_matmul_peak(n: int = 1024, seconds: float = 1.0, dtype=torch.float32) -> Dict[str, Any]:
    """A measured roofline: FLOP/s of repeated ``n x n`` matmuls in this process for ~``seconds``
    (best of several blocks). On CPU it stands in for a peak that has no table value; it depends on
    the threads this process has and on what else runs on the cores at the same time."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up: first-touch pages, BLAS thread pool start
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        best = max(best, 4 * 2 * n ** 3 / (time.perf_counter() - t0))
    return {"flops": best, "source": f"measured: best {n}x{n} {str(dtype).split('.')[-1]} matmul FLOP/s "
                                      f"in this process, {torch.get_num_threads()} threads",
            "device": "cpu"}


def profiler_peak_bytes(prof) -> int:
    """Peak of the running sum of the allocator events of a ``torch.profiler.profile(profile_memory=True)``
    run: the most bytes allocated at once beyond what was live when it started."""
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    cur = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def median_time(fn: Callable[[], Any], iters: int, warmup: int, sync: Callable[[], Any] = lambda: None,
                progress: str = "") -> Dict[str, Any]:
    """Median (and all) wall times of ``fn`` over ``iters`` runs after ``warmup`` untimed runs."""
    for i in range(warmup):
        fn()
        if progress:
            print(f"  {progress}: warm-up {i + 1}/{warmup}", flush=True)
    times: List[float] = []
    for i in range(iters):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
        if progress:
            print(f"  {progress}: iter {i + 1}/{iters} {times[-1]:.3f} s", flush=True)
    return {"median_s": statistics.median(times), "times_s": times}
