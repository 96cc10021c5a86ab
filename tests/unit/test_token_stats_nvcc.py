"""Compile-only check of the CUDA kernel source (no GPU needed): nvcc -arch=sm_90 -c."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH: cannot compile-check the CUDA kernel")
def test_cuda_kernel_compiles_for_sm90(tmp_path):
    src = ROOT / "csrc" / "token_stats_cuda.cu"
    res = subprocess.run(["nvcc", "-arch=sm_90", "-O3", "-std=c++17", "-Werror", "all-warnings",
                          "-c", str(src), "-o", str(tmp_path / "token_stats_cuda.o")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-4000:]
    assert (tmp_path / "token_stats_cuda.o").stat().st_size > 0
