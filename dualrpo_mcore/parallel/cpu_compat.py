"""The one place that makes Megatron-Core run on CPU.

Megatron-Core assumes CUDA in a handful of spots: it allocates buffers on
``torch.cuda.current_device()``, keeps model-parallel RNG states through the CUDA generator, moves
tensors with ``.cuda()`` and builds causal masks with ``device="cuda"``. On a machine without CUDA
(tests, CI, the CPU demo) we route all of those to the CPU instead of forking Megatron code:

* ``torch.cuda.current_device`` returns 0 and a ``TorchFunctionMode`` rewrites any ``device``
  argument that names CUDA (or a bare int) to CPU, and turns ``Tensor.cuda()`` into a no-op;
* the CUDA RNG tracker reads and writes the CPU generator, so ``model_parallel_cuda_manual_seed``
  and ``get_cuda_rng_tracker().fork()`` behave as on GPU (distinct TP streams for init/dropout);
* ``torch.cuda.synchronize`` / ``empty_cache`` become no-ops, and ``torch.cuda.current_stream`` /
  ``default_stream`` return a stream whose waits are no-ops (CPU work is already ordered);
  megatron-core >= 0.19 asks for the current stream in every ``start_grad_sync``;
* gradient clipping's fallback scale (no Apex/TE) works in place instead of out of place plus a copy;
* ``Tensor.type()`` (no argument: the type *name*) reports a CPU tensor under its CUDA name, because
  Megatron's optimizers gate on that string (``'torch.cuda.FloatTensor'`` in the distributed
  optimizer's parameter sharding and in ``clip_grads``); conversions ``Tensor.type(dtype)`` are untouched.

:func:`enable` is idempotent and does nothing when CUDA is available, so production code can call it
unconditionally.
"""
from __future__ import annotations

import threading

import torch
from torch.overrides import TorchFunctionMode

_lock = threading.Lock()
_enabled = False
_mode: "_CpuDeviceMode | None" = None


def _is_cuda_device(dev) -> bool:
    if isinstance(dev, bool):
        return False
    if isinstance(dev, int):
        return True  # Megatron passes torch.cuda.current_device() (an int) as a device.
    if isinstance(dev, str):
        return dev.startswith("cuda")
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    return False


_CPU = torch.device("cpu")
# Tensor methods whose first positional argument may be a device (new_* take sizes there).
_TO_METHODS = {torch.Tensor.to}


class _CpuDeviceMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU for every torch call made under it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        dev = kwargs.get("device")
        if dev is not None and _is_cuda_device(dev):
            kwargs = dict(kwargs, device=_CPU)
        if func in _TO_METHODS and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU) + tuple(args[2:])
        out = func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and isinstance(out, str) \
                and out.startswith("torch.") and not out.startswith("torch.cuda."):
            return "torch.cuda." + out[len("torch."):]
        return out


def _cpu_get_rng_state(*_args, **_kwargs):
    return torch.get_rng_state()


def _cpu_set_rng_state(state, *_args, **_kwargs):
    torch.set_rng_state(state)


def _patch_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = _cpu_get_rng_state
    mrandom._set_cuda_rng_state = _cpu_set_rng_state


def _in_place_scale(chunk_size, noop_flag, tensor_lists, scale):
    """megatron-core's ``local_multi_tensor_scale`` (the fallback without Apex/TE) scales out of place and
    copies back even when source and destination are one list, as in gradient clipping: a temporary and
    a second pass over every gradient. Same products, written in place there."""
    for src, dst in zip(tensor_lists[0], tensor_lists[1]):
        if src is dst:
            dst.mul_(scale)
        else:
            dst.copy_(src * scale)


def _patch_clip_scale() -> None:
    from megatron.core.optimizer import clip_grads
    from megatron.core.utils import local_multi_tensor_scale

    if getattr(clip_grads, "multi_tensor_scale_impl", None) is local_multi_tensor_scale:
        clip_grads.multi_tensor_scale_impl = _in_place_scale


class _NullStream:
    """What megatron-core does with a CUDA stream, for CPU tensors: nothing to order.

    0.19's ``start_grad_sync`` calls ``current_stream().wait_event`` for CUDA-graph gradients (none
    on CPU); 0.16-0.18 reach the stream only with ``overlap_grad_reduce``.
    """

    device = _CPU

    def wait_event(self, event=None) -> None:
        return None

    def wait_stream(self, stream=None) -> None:
        return None

    def record_event(self, event=None):
        return event

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True


_NULL_STREAM = _NullStream()


def _patch_torch_cuda() -> None:
    torch.cuda.current_device = lambda: 0
    torch.cuda.get_rng_state = _cpu_get_rng_state
    torch.cuda.set_rng_state = _cpu_set_rng_state
    # Not torch.manual_seed: that calls torch.cuda.manual_seed_all itself.
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda *a, **k: None
    torch.cuda.current_stream = lambda *a, **k: _NULL_STREAM
    torch.cuda.default_stream = lambda *a, **k: _NULL_STREAM


def enable(force: bool = False) -> bool:
    """Route Megatron-Core's CUDA calls to CPU in this process. Returns True when active.

    A no-op when CUDA is available (unless ``force``); safe to call many times.
    """
    global _enabled, _mode
    if torch.cuda.is_available() and not force:
        return False
    with _lock:
        if _enabled:
            return True
        _patch_torch_cuda()
        _patch_rng_tracker()
        _patch_clip_scale()
        _mode = _CpuDeviceMode()
        # Entered for the life of the process: Megatron allocates lazily (buffers, masks), so a
        # scoped context would miss calls made later from arbitrary places.
        _mode.__enter__()
        _enabled = True
    return True
