"""Which implementation each compiled op runs on a device: CUDA, C++ or the pure-torch fallback.

``dualrpo train``, ``bench`` and ``demo`` print this at start, and ``dualrpo env`` in its report,
because a kernel that failed to build or load still gives the right numbers (the fallback has the
same semantics), only slower and with more memory: without a line at start nobody would notice.
The answer is read from the dispatcher (which device keys each ``torch.ops.dualrpo`` op has a
kernel for), so it reports what is registered, not what the build meant to register.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import List, Optional, TextIO

import torch

from . import _ext

# The ops csrc/ registers, as torch.ops.dualrpo.<name>, and what they serve.
OPS = {"partials": "token_stats forward", "grad_logits": "token_stats backward"}
# What the compiled path is called per device type; it is also the fastest path there.
COMPILED_NAME = {"cpu": "C++", "cuda": "CUDA"}


@dataclass(frozen=True)
class KernelPath:
    op: str
    device: str
    path: str
    """'CUDA', 'C++' or 'torch'."""
    fastest: str
    """The fastest path this package has for the device."""
    reason: str = ""
    """Why ``path`` is not ``fastest`` (empty when it is)."""

    @property
    def is_fastest(self) -> bool:
        return self.path == self.fastest


def _registered(op: str, device_type: str) -> bool:
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"dualrpo::{op}", key))
    except RuntimeError:  # the op was never defined: the extension is not loaded
        return False


REBUILD = ("rebuild with `pip install --no-build-isolation -e .`, which fails with the reason when the kernel "
           "cannot be built; `dualrpo env` shows versions and toolkit")


def _missing_reason(device_type: str) -> str:
    if _ext.load_extension() is None:
        return f"dualrpo_mcore._C did not load ({_ext.load_error()}); {REBUILD}"
    if device_type == "cuda":
        return f"dualrpo_mcore._C was built without CUDA (DUALRPO_BUILD_CUDA=0, or a CPU torch); {REBUILD}"
    return f"no compiled kernel for {device_type}"


def kernel_paths(device: Optional[torch.device] = None) -> List[KernelPath]:
    """One :class:`KernelPath` per compiled op for ``device`` (default: CUDA when available, else CPU),
    honouring ``DUALRPO_TOKEN_STATS_BACKEND`` as ``token_stats`` does."""
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    dt = device.type
    fastest = COMPILED_NAME.get(dt, "torch")
    forced = (os.environ.get(_ext.BACKEND_ENV) or "auto").lower()
    _ext.load_extension()
    out = []
    for op in OPS:
        if forced == "torch":
            out.append(KernelPath(op, dt, "torch", fastest, f"{_ext.BACKEND_ENV}=torch forces it; unset it "
                                                            f"to use the compiled kernel"))
        elif _registered(op, dt):
            out.append(KernelPath(op, dt, COMPILED_NAME[dt], fastest))
        else:
            out.append(KernelPath(op, dt, "torch", fastest, _missing_reason(dt)))
    return out


def describe(paths: List[KernelPath]) -> List[str]:
    """Lines for a log: one summary, then one warning per reason the fastest path is not taken."""
    if not paths:
        return []
    dev = paths[0].device
    summary = ", ".join(f"{p.op} ({OPS.get(p.op, p.op)}) {p.path}" for p in paths)
    lines = [f"kernels on {dev}: {summary}"]
    slow = [p for p in paths if not p.is_fastest]
    for reason in dict.fromkeys(p.reason for p in slow):
        ops = ", ".join(p.op for p in slow if p.reason == reason)
        lines.append(f"WARNING: {ops} on {dev} run the {slow[0].path} path, not {slow[0].fastest}, the fastest "
                     f"here: {reason}")
    return lines


def log_kernel_paths(command: str, device: Optional[torch.device] = None,
                     stream: Optional[TextIO] = None) -> List[KernelPath]:
    """Print :func:`describe` for ``command`` (once per job: rank 0 under torchrun) and return the paths."""
    paths = kernel_paths(device)
    if os.environ.get("RANK", "0") == "0":
        stream = stream or sys.stderr
        for line in describe(paths):
            print(f"[dualrpo {command}] {line}", file=stream, flush=True)
    return paths
