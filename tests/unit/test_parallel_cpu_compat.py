"""The CPU routing covers what megatron-core 0.19 calls on every grad sync (torch.cuda.current_stream)."""
import subprocess
import sys

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
print("ok")
"""


def test_stream_calls_are_no_ops_on_cpu():
    # A fresh interpreter: enable() patches torch.cuda and enters a TorchFunctionMode for good.
    res = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]
