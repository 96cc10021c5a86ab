"""The one place that makes Megatron-Core run on CPU.

Megatron-Core assumes CUDA in a handful of spots: it allocates buffers on
``torch.cuda.current_device()``, keeps model-parallel RNG states through the CUDA generator, moves
tensors with ``.cuda()`` and builds causal masks with ``device="cuda"``. On a machine without CUDA
(tests, CI, the CPU demo) we route all of those to the CPU instead of forking Megatron code:

* ``torch.cuda.current_device`` returns 0; torch's factories, ``Tensor.new_*`` and ``Tensor.to`` get
  any ``device`` that names CUDA (or a bare int) as CPU, and ``Tensor.cuda()`` is a no-op;
* the CUDA RNG tracker reads and writes the CPU generator, so ``model_parallel_cuda_manual_seed``
  and ``get_cuda_rng_tracker().fork()`` behave as on GPU (distinct TP streams for init/dropout);
* ``torch.cuda.synchronize`` / ``empty_cache`` become no-ops, and ``torch.cuda.current_stream`` /
  ``default_stream`` return a stream whose waits are no-ops (CPU work is already ordered);
* gradient clipping's fallback scale (no Apex/TE) works in place instead of out of place plus a copy;
* ``Tensor.type()`` (no argument: the type *name*) reports a CPU tensor under its CUDA name, because
  Megatron's optimizers gate on that string (``'torch.cuda.FloatTensor'`` in the distributed
  optimizer's parameter sharding and in ``clip_grads``); conversions ``Tensor.type(dtype)`` are untouched.

:func:`enable` is idempotent and does nothing when CUDA is available, so production code can call it
unconditionally.
"""
from __future__ import annotations

import functools
import threading

import torch

_lock = threading.Lock()
_enabled = False


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
# Every torch function and Tensor method through which megatron-core (0.16-0.19) names a device: a
# module-level wrapper on each, rather than a TorchFunctionMode, because a mode runs Python on *every*
# torch call (~1.7 us each; 13% of a tiny model's update step), where these wrappers run only on
# allocation. A CUDA device reaching any other function still fails loudly ("Torch not compiled with CUDA").
_FACTORIES = ("arange", "as_tensor", "empty", "empty_like", "empty_strided", "eye", "full", "full_like",
              "linspace", "ones", "ones_like", "rand", "rand_like", "randint", "randn", "randn_like", "randperm",
              "tensor", "zeros", "zeros_like")
_NEW_METHODS = ("new_empty", "new_full", "new_ones", "new_tensor", "new_zeros")


def _on_cpu(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        return fn(*args, **kwargs)
    return wrapper


def _patch_devices() -> None:
    for name in _FACTORIES:
        setattr(torch, name, _on_cpu(getattr(torch, name)))
    for name in _NEW_METHODS:
        setattr(torch.Tensor, name, _on_cpu(getattr(torch.Tensor, name)))
    tensor_to, tensor_type = torch.Tensor.to, torch.Tensor.type

    def to(self, *args, **kwargs):
        if args and _is_cuda_device(args[0]):
            args = (_CPU,) + args[1:]
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        return tensor_to(self, *args, **kwargs)

    def type_(self, *args, **kwargs):
        out = tensor_type(self, *args, **kwargs)
        if not args and not kwargs and out.startswith("torch.") and not out.startswith("torch.cuda."):
            return "torch.cuda." + out[len("torch."):]
        return out

    torch.Tensor.to = to
    torch.Tensor.type = type_
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


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
    global _enabled
    if torch.cuda.is_available() and not force:
        return False
    with _lock:
        if _enabled:
            return True
        _patch_torch_cuda()
        _patch_rng_tracker()
        _patch_clip_scale()
        # For the life of the process: Megatron allocates lazily (buffers, masks, the schedules' token
        # counters), so a scoped patch would miss calls made later from arbitrary places.
        _patch_devices()
        _enabled = True
    return True
