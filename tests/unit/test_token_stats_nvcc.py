"""Compile checks of the CUDA kernel source (no GPU needed).

nvcc compiles csrc/token_stats_cuda.cu with the CUDA options and architectures that CMakeLists.txt
gives the real build (read from that file, so the two cannot drift apart: --use_fast_math changes
code generation), warnings as errors. The PTX then shows the memory access widths: the 16-byte
vector instantiations must load and store 16 bytes at a time, forward and backward. A source
check, which needs no nvcc, keeps the vector conversions free of type punning.
"""
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "csrc" / "token_stats_cuda.cu"
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None,
                                reason="nvcc not on PATH: cannot compile-check the CUDA kernel")


def cmake_cuda_options():
    """(compile options, architectures) of the CUDA language in CMakeLists.txt."""
    text = (ROOT / "CMakeLists.txt").read_text()
    opts = re.findall(r"\$<\$<COMPILE_LANGUAGE:CUDA>:([^>]*)>", text)
    archs = re.search(r"set\(CMAKE_CUDA_ARCHITECTURES ([0-9 ]+)\)", text)
    assert opts and archs, "CMakeLists.txt no longer sets CUDA options/architectures the way this test reads them"
    return [o for group in opts for o in group.split()], archs.group(1).split()


def nvcc_command(*extra):
    opts, _ = cmake_cuda_options()
    return ["nvcc", *opts, "-std=c++17", "-Werror", "all-warnings", *extra, str(SRC)]


def test_compile_check_uses_the_build_flags():
    opts, archs = cmake_cuda_options()
    cmd = nvcc_command()
    assert "--use_fast_math" in opts and "-O3" in opts  # what the real build compiles with
    assert all(o in cmd for o in opts) and archs


@needs_nvcc
def test_cuda_kernel_compiles_with_build_flags(tmp_path):
    _, archs = cmake_cuda_options()
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    res = subprocess.run(nvcc_command(*gencode, "-c", "-o", str(tmp_path / "k.o")),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    assert (tmp_path / "k.o").stat().st_size > 0


def _entries(ptx):
    """{(kernel, dtype, VEC, REF): Counter of global load/store instructions}."""
    out = {}
    for body in re.split(r"\n\.entry ", ptx)[1:]:
        m = re.search(r"(partials_kernel|grad_kernel)I(f|13__nv_bfloat16|6__half)Li(\d+)ELb([01])E", body)
        if m:
            kernel, dtype, vec, ref = m.groups()
            out[(kernel, dtype, int(vec), ref == "1")] = Counter(re.findall(r"\b((?:ld|st)\.global[\w.]*)", body))
    return out


@needs_nvcc
def test_vector_paths_move_16_bytes_per_access(tmp_path):
    # Forward and backward alike: a 16-byte instantiation reads z (and z_ref) and writes dz only
    # through v4 (16-byte) accesses; the scalar tail, stats, grads and labels are the only other
    # global accesses. A split pair load (v2.u16, u32 of a half2) means the compiler gave up on
    # the 128-bit access.
    res = subprocess.run(nvcc_command("-arch=sm_90", "-ptx", "-o", str(tmp_path / "k.ptx")),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    entries = _entries((tmp_path / "k.ptx").read_text())
    assert len(entries) == 24, sorted(entries)
    for (kernel, dtype, vec, ref), ops in entries.items():
        if vec == 1:
            assert not any(".v4." in op for op in ops), (kernel, dtype, ops)
            continue
        what = f"{kernel}<{dtype}, {vec}, ref={ref}>: {dict(ops)}"
        loads = sum(n for op, n in ops.items() if op.startswith("ld.") and ".v4." in op)
        assert loads >= 1 + ref, what
        if kernel == "grad_kernel":
            assert sum(n for op, n in ops.items() if op.startswith("st.") and ".v4." in op) >= 1, what
        for op in ops:
            pair = dtype != "f" and op.startswith("ld.") and ".v4." not in op and re.search(r"\.[ubs]32$", op)
            assert ".v2." not in op and not pair, f"{op} in {what}"
            if kernel == "grad_kernel" and dtype != "f" and op.startswith("st."):
                assert ".v4." in op or op.endswith((".u16", ".b16")), f"{op} in {what}"


def test_vector_conversions_do_not_type_pun():
    # A 16-byte vector is reinterpreted only as the aggregate of its own element type (Pack<S>),
    # never as pairs (__nv_bfloat162 / __half2) or other vector types: that aliasing is undefined
    # behaviour the optimiser may exploit.
    src = re.sub(r"//[^\n]*", "", SRC.read_text())
    casts = re.findall(r"reinterpret_cast<([^>]*>?)[^>]*>", src)
    assert casts, "no reinterpret_cast left: update this check"
    for target in casts:
        assert "Pack<S>" in target or "uintptr_t" in target, f"reinterpret_cast<{target}> in {SRC.name}"
