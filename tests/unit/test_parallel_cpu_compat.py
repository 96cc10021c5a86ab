"""The CPU routing covers what megatron-core 0.19 calls on every grad sync (torch.cuda.current_stream), and
its in-place clipping scale equals Megatron's own fallback."""
import subprocess
import sys

import torch

CHECK = """
import torch
from dualrpo_mcore.parallel import cpu_compat
assert cpu_compat.enable(force=True)
s = torch.cuda.current_stream()
s.wait_event(None); s.wait_stream(torch.cuda.default_stream()); s.synchronize()
assert s.query() and torch.cuda.current_stream() is s
torch.cuda.synchronize(); torch.cuda.empty_cache()
assert torch.cuda.current_device() == 0
assert torch.empty(2, device="cuda").device.type == "cpu"
# Every way megatron-core names a device: factories (a bare int is torch.cuda.current_device()), new_*,
# .to/.cuda, and module constructors (they allocate through torch.empty).
x = torch.zeros(3, device=torch.cuda.current_device())
assert x.device.type == "cpu" and torch.arange(4, device=torch.device("cuda:0")).device.type == "cpu"
assert x.new_zeros(2, device="cuda").device.type == "cpu" and x.new_tensor([1.0], device=0).device.type == "cpu"
assert x.to("cuda").device.type == "cpu" and x.to(device="cuda", dtype=torch.float64).dtype == torch.float64
assert x.cuda() is x and torch.nn.Linear(2, 2, device="cuda").weight.device.type == "cpu"
# Megatron's optimizers gate on the type *name*; conversions are untouched.
assert x.type() == "torch.cuda.FloatTensor" and x.type(torch.float64).dtype == torch.float64
assert torch.ones(2, dtype=torch.int32).to(x).dtype == torch.float32
print("ok")
"""


def test_stream_calls_are_no_ops_on_cpu():
    # A fresh interpreter: enable() patches torch.cuda and torch's factories for good.
    res = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


def test_clip_scale_in_place_equals_megatrons_fallback():
    """The in-place clipping scale gives Megatron's own ``local_multi_tensor_scale`` results bitwise, in place
    when source and destination are one list (clipping), into the destination otherwise."""
    from megatron.core.utils import local_multi_tensor_scale

    from dualrpo_mcore.parallel.cpu_compat import _in_place_scale

    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(n, generator=g) for n in (7, 1000, 33)]
    want = [t.clone() for t in grads]
    local_multi_tensor_scale(2048, None, [want, want], 0.37)
    storage = [t.data_ptr() for t in grads]
    _in_place_scale(2048, None, [grads, grads], 0.37)
    assert all(torch.equal(a, b) for a, b in zip(grads, want))
    assert [t.data_ptr() for t in grads] == storage
    src, dst, ref = [torch.randn(5, generator=g)], [torch.zeros(5)], [torch.zeros(5)]
    _in_place_scale(2048, None, [src, dst], 3.0)
    local_multi_tensor_scale(2048, None, [src, ref], 3.0)
    assert torch.equal(dst[0], ref[0])
