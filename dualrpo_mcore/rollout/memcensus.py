"""Peak bytes of tensor storage created by a piece of code, seen through torch's dispatcher.

An independent check of the weight exporter's own accounting: a ``TorchDispatchMode`` notes
every storage that an op returns for the first time (skipping storages that already existed, such
as the model's parameters and their views) and keeps a weak reference to it; after every op the
still-alive storages are summed. Unlike the profiler's CPU memory events this is deterministic
(collectives run part of their work on gloo threads, whose allocation events the profiler may lose or
misorder); it does not see allocations made inside C++ kernels or communication libraries that
never surface as tensors (gloo's staging copy, NCCL's internal buffers).
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Set, Tuple

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class StorageCensus(TorchDispatchMode):
    def __init__(self, existing: Iterable[torch.Tensor] = ()):
        super().__init__()
        self.existing: Set[int] = {t.untyped_storage().data_ptr() for t in existing}
        self.live: Dict[int, Tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                ptr = st.data_ptr()
                if ptr not in self.existing and ptr not in self.live and st.nbytes() > 0:
                    self.live[ptr] = (StorageWeakRef(st), st.nbytes())
        for ptr in [p for p, (ref, _) in self.live.items() if ref.expired()]:
            del self.live[ptr]
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def peak_new_bytes(fn: Callable[[], object], existing: Iterable[torch.Tensor] = ()) -> int:
    """Run ``fn`` and return the most bytes of newly created tensor storage alive at once."""
    census = StorageCensus(existing)
    with census:
        fn()
    return census.peak
