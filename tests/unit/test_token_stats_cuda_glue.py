"""The CUDA glue (csrc/token_stats_cuda_glue.cpp) on a CPU-only torch, kernels emulated.

csrc/emu/cuda_glue_driver.cpp includes the glue, gives it tensors tagged cuda:0 / cuda:1 over host
memory and stubs for the current stream, and links the emulated kernel (csrc/emu/). Valid calls
must agree with the pure-torch partials / gradient; every malformed call must be refused with a
message that names the problem, before any kernel runs.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import helpers.token_stats_emu as E
from dualrpo_mcore.ops import _ext  # noqa: F401  (registers torch.ops.dualrpo_fallback)

TORCH_DIR = Path(torch.__file__).parent
TORCH_INC = TORCH_DIR / "include"


def _cuda_include():
    """A CUDA toolkit include dir (for cuda_runtime_api.h), or None."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.append(str(Path(os.path.realpath(nvcc)).parents[1]))
    for root in filter(None, roots):
        if (Path(root) / "include" / "cuda_runtime_api.h").exists():
            return Path(root) / "include"
    return None


CUDA_INC = _cuda_include()
pytestmark = [
    pytest.mark.skipif(E.GXX is None, reason="g++ not on PATH: cannot build the glue driver"),
    pytest.mark.skipif(CUDA_INC is None, reason="no CUDA toolkit headers (cuda_runtime_api.h) for the glue"),
    pytest.mark.skipif(not (TORCH_INC / "c10" / "cuda" / "CUDAStream.h").exists(),
                       reason="this torch ships no c10/cuda headers"),
]

EXPECTED_ERRORS = {
    "labels_length": "labels must be [T] with T = 3",
    "labels_2d": "labels must be [T] with T = 3",
    "labels_int32": "labels must be int64",
    "labels_on_cpu": "labels are on cpu but logits on cuda:0",
    "labels_on_cuda1": "labels are on cuda:1 but logits on cuda:0",
    "logits_3d": "logits must be [T, V_local]",
    "logits_on_cpu": "logits must be a CUDA tensor",
    "logits_float64": "not supported",
    "n_real_too_big": "n_real = 41 outside [0, V_local = 40]",
    "n_real_negative": "n_real = -1 outside",
    "vocab_size_zero": "vocab_size > 0",
    "inv_t_zero": "inv_t",
    "ref_shape": "ref_logits must have the shape of logits",
    "ref_dtype": "ref_logits must have the dtype of logits",
    "ref_on_cuda1": "ref_logits are on cuda:1",
    "grad_stats_rows": "saved stats must be [T = 3, >= 5]",
    "grad_stats_cols": "saved stats must be [T = 3, >= 5]",
    "grad_grads_shape": "grads must be [T = 3, 4]",
    "grad_stats_on_cpu": "must be on the device of logits",
    "grad_labels_length": "labels must be [T] with T = 3",
}


def build_and_run(tmp: Path, glue: Path = E.CSRC / "token_stats_cuda_glue.cpp") -> dict:
    stub = tmp / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True, exist_ok=True)
    (stub / "cuda_cmake_macros.h").write_text("// generated at torch build time; empty is enough here\n")
    inc = [f"-I{E.CSRC}", f"-I{tmp / 'stub'}", f"-I{TORCH_INC}",
           f"-I{TORCH_INC / 'torch' / 'csrc' / 'api' / 'include'}", f"-I{CUDA_INC}"]
    driver = [E.GXX, "-std=c++17", "-O0", "-w", *inc, f'-DDUALRPO_GLUE_SOURCE="{glue}"', "-c",
              str(E.EMU / "cuda_glue_driver.cpp"), "-o", str(tmp / "driver.o")]
    built = E.build_all([("driver", driver),
                         ("kernel", E.compile_cmd(tmp / "kernel.o", E.KERNEL, ["-O1"])),
                         ("engine", E.compile_cmd(tmp / "engine.o", E.EMU / "cuda_emu.cpp", ["-O1"]))])
    for name, (rc, err) in built.items():
        assert rc == 0, f"{name}:\n{err[-4000:]}"
    lib = TORCH_DIR / "lib"
    link = [E.GXX, *(str(tmp / f"{n}.o") for n in ("driver", "kernel", "engine")), f"-L{lib}",
            f"-Wl,-rpath,{lib}", "-ltorch_cpu", "-lc10", "-o", str(tmp / "glue")]
    res = subprocess.run(link, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-4000:]
    run = subprocess.run([str(tmp / "glue")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-4000:]
    out = {}
    for line in run.stdout.splitlines():
        status, rest = line.split(" ", 1)
        name, _, tail = rest.partition(": " if status == "error" else " ")
        out[name] = (status, tail)
    return out


@pytest.fixture(scope="module")
def glue(tmp_path_factory):
    return build_and_run(tmp_path_factory.mktemp("cuda_glue"))


def _logits(rows, cols, salt):  # the driver's fill(): exact in bf16
    i = torch.arange(rows)[:, None]
    j = torch.arange(cols)[None, :]
    return ((((i * 131 + j * 71 + salt * 17) % 97) - 48) / 8.0).to(torch.bfloat16)


def _values(glue, name, shape):
    status, tail = glue[name]
    assert status == "ok", f"{name}: {tail}"
    return torch.tensor([float.fromhex(v) for v in tail.split()], dtype=torch.float64).view(shape)


def test_valid_calls_match_the_torch_path(glue):
    z, r = _logits(3, 40, 0), _logits(3, 40, 1)
    y = torch.tensor([0, -100, 14])
    inv_t = 1.0 / 0.7
    for name, ref in (("partials", r), ("partials_noref", None)):
        want = torch.ops.dualrpo_fallback.partials(z, y, ref, 3, 37, 50, inv_t).double()
        got = _values(glue, name, want.shape)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4, msg=name)
    stats = torch.tensor([[6.0 / 0.7, 2.5, 1.0, 6.0 / 0.7, 0.1]] * 3, dtype=torch.float32)
    grads = torch.tensor([[1.0, 0.5, -0.25, 0.125], [0.0, 0.5, -0.25, 0.125], [1.0, 0.5, -0.25, 0.125]])
    want = torch.ops.dualrpo_fallback.grad_logits(z, y, r, stats, grads, 3, 37, 50, inv_t).double()
    torch.testing.assert_close(_values(glue, "grad", want.shape), want, rtol=1e-2, atol=1e-6)


@pytest.mark.parametrize("name", sorted(EXPECTED_ERRORS))
def test_malformed_calls_are_refused(glue, name):
    status, msg = glue[name]
    assert status == "error", f"{name} was accepted"
    assert EXPECTED_ERRORS[name] in msg, msg


if __name__ == "__main__":  # python test_token_stats_cuda_glue.py GLUE.cpp: report on another glue
    import tempfile

    res = build_and_run(Path(tempfile.mkdtemp()), Path(sys.argv[1]).resolve())
    for n, (s, t) in sorted(res.items()):
        print(f"{n:20s} {s:5s} {t[:110] if s == 'error' else ''}")
