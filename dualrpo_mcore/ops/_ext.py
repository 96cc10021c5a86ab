"""Find the compiled kernels (``dualrpo_mcore._C``) and pick a backend for a tensor.

The extension registers ``torch.ops.dualrpo.partials`` / ``torch.ops.dualrpo.grad_logits`` with
a CPU kernel (always built by ``pip install``) and, in a CUDA build, a CUDA kernel. The same two
operators exist as ``torch.ops.dualrpo_fallback.*`` in pure torch (``_fallback.py``), so the
autograd function and the tensor-parallel merge do not care which one runs. Both have fake
(meta) implementations, so ``torch.compile`` traces through them without a graph break.

Backend choice: the ``backend=`` argument of ``token_stats``, else the environment variable
``DUALRPO_TOKEN_STATS_BACKEND`` (``auto`` | ``ext`` | ``torch``), else ``auto``: the compiled
kernel when it is loaded and supports the device, else the fallback (logged once).
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from . import _fallback

log = logging.getLogger(__name__)

BACKEND_ENV = "DUALRPO_TOKEN_STATS_BACKEND"
_state = {"loaded": None, "error": None, "warned": False}

_PARTIALS_SCHEMA = ("(Tensor logits, Tensor labels, Tensor? ref, int vocab_start, int n_real, "
                    "int vocab_size, float inv_t) -> Tensor")
_GRAD_SCHEMA = ("(Tensor logits, Tensor labels, Tensor? ref, Tensor stats, Tensor grads, "
                "int vocab_start, int n_real, int vocab_size, float inv_t) -> Tensor")


def load_extension():
    """Import ``dualrpo_mcore._C`` once; return the module or None (reason in ``load_error()``)."""
    if _state["loaded"] is None:
        try:
            from dualrpo_mcore import _C  # noqa: F401  (registers torch.ops.dualrpo.*)
            _state["loaded"] = _C
        except ImportError as exc:  # not built here, or built against another torch
            _state["loaded"] = False
            _state["error"] = f"{type(exc).__name__}: {exc}"
    return _state["loaded"] or None


def load_error() -> Optional[str]:
    load_extension()
    return _state["error"]


def ext_supports(device: torch.device, dtype: torch.dtype = torch.float32) -> bool:
    ext = load_extension()
    if ext is None:
        return False
    if device.type == "cpu":
        return True  # fp32/bf16/fp16, and fp64 (accumulated in fp64) for gradcheck
    # The CUDA kernel reads fp32/bf16/fp16; float64 on a GPU takes the torch path.
    return device.type == "cuda" and bool(ext.has_cuda()) and dtype != torch.float64


def choose(device: torch.device, backend: Optional[str] = None,
           dtype: torch.dtype = torch.float32) -> str:
    """Return ``"ext"`` or ``"torch"`` for tensors on ``device``."""
    want = (backend or os.environ.get(BACKEND_ENV) or "auto").lower()
    if want not in ("auto", "ext", "torch"):
        raise ValueError(f"token_stats backend must be auto, ext or torch, got {want!r} "
                         f"(argument backend= or env {BACKEND_ENV})")
    if want == "torch":
        return "torch"
    if ext_supports(device, dtype):
        return "ext"
    if want == "ext":
        raise RuntimeError(f"token_stats backend 'ext' requested but the compiled kernel is not "
                           f"available for {device}/{dtype} ({load_error() or 'built without this device'}); "
                           f"rebuild with `pip install --no-build-isolation -e .`")
    if not _state["warned"]:
        _state["warned"] = True
        log.warning("dualrpo_mcore.ops: compiled token-stats kernel unavailable for %s (%s); "
                    "using the pure-torch fallback (same results, slower, more memory)",
                    device, load_error() or "built without this device")
    return "torch"


def ops(backend: str):
    """(partials, grad_logits) operator pair for a backend chosen by ``choose``."""
    if backend == "ext":
        return torch.ops.dualrpo.partials, torch.ops.dualrpo.grad_logits
    return torch.ops.dualrpo_fallback.partials, torch.ops.dualrpo_fallback.grad_logits


# --- the fallback as operators, and fake implementations for both namespaces ------------------

_lib = torch.library.Library("dualrpo_fallback", "DEF")
_lib.define("partials" + _PARTIALS_SCHEMA)
_lib.define("grad_logits" + _GRAD_SCHEMA)
_lib.impl("partials", lambda z, y, r, vs, n, V, it: _fallback.partials(z, y, r, vs, n, it),
          "CompositeExplicitAutograd")
_lib.impl("grad_logits", lambda z, y, r, st, g, vs, n, V, it:
          _fallback.grad_logits(z, y, r, st, g, vs, n, V, it), "CompositeExplicitAutograd")


def _fake_partials(z, y, r, vs, n, V, it):
    return z.new_empty((z.shape[0], 6 if r is None else 9), dtype=_fallback.acc_dtype(z.dtype))


def _fake_grad(z, y, r, st, g, vs, n, V, it):
    return torch.empty_like(z)


torch.library.register_fake("dualrpo_fallback::partials", _fake_partials, lib=_lib)
torch.library.register_fake("dualrpo_fallback::grad_logits", _fake_grad, lib=_lib)

if load_extension() is not None:
    torch.library.register_fake("dualrpo::partials", _fake_partials, lib=_lib)
    torch.library.register_fake("dualrpo::grad_logits", _fake_grad, lib=_lib)
