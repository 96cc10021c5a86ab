"""Build helper imported by setup.py: the csrc/ extension ``dualrpo_mcore._C`` through CMake.

Works for ``pip install --no-build-isolation .`` and ``... -e .`` (setuptools builds into
build/ and, when editable, copies the module next to the sources). A failed build fails the
install, with the reason and the switch that opts out: pip hides build output unless it fails,
so a warning would let the kernel go missing unnoticed. Environment knobs:

  DUALRPO_BUILD_EXT=0      install without the compiled kernels (ops use the pure-torch path)
  DUALRPO_BUILD_CUDA=0|1   CUDA kernel off/required (default: built when torch is a CUDA build;
                           then a CUDA toolkit must be found, see ``find_cuda_toolkit``)
  DUALRPO_CPU_ARCH=...     -march for the CPU kernel (default ``native``: the package is built
                           where it runs; set e.g. ``x86-64-v3`` for a portable wheel, or empty)
  DUALRPO_BUILD_JOBS=N     parallel compile jobs (default: CPU count, at most 4)
  CUDA_HOME / CUDA_PATH    the CUDA toolkit root, when the search below does not find it
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import List, Optional

from setuptools import Extension
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
OPT_OUT = ("set DUALRPO_BUILD_CUDA=0 to build only the C++ (CPU) kernel, or DUALRPO_BUILD_EXT=0 to "
           "install without compiled kernels (token_stats then runs its slower pure-torch path)")


class BuildError(RuntimeError):
    """The extension cannot be built here; the message says why and how to opt out."""


# --- finding the CUDA toolkit ---------------------------------------------------------------------

@dataclass
class CudaToolkit:
    root: str
    nvcc: str
    version: str
    found_by: str
    runtime_libs: List[str] = field(default_factory=list)
    """Directories of the nvidia wheels' CUDA libraries (the ones torch itself loads)."""


def _is_exe(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def is_toolkit_root(root: Optional[str]) -> bool:
    return bool(root) and os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")) \
        and _is_exe(os.path.join(root, "bin", "nvcc"))


def nvcc_reported_root(nvcc: str) -> Optional[str]:
    """The toolkit an ``nvcc`` really runs from, whatever stands in front of it.

    An nvcc on PATH may be a wrapper script, a symlink farm or a ccache shim; its parent folder is
    then no toolkit (CMake and torch both guess ``dirname(dirname(nvcc))`` and find no headers).
    The real driver prints its own location (``TOP=``) in a dry run, which executes nothing.
    """
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cu")
        open(src, "w").close()
        try:
            res = subprocess.run([nvcc, "--dryrun", "-c", src, "-o", os.path.join(tmp, "probe.o")],
                                 capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
    for key in ("TOP", "_HERE_"):
        m = re.search(rf"^#\$ {key}=(.+)$", res.stdout + res.stderr, re.M)
        if m:
            path = m.group(1).strip()
            root = os.path.realpath(path if key == "TOP" else os.path.join(path, ".."))
            if is_toolkit_root(root):
                return root
    return None


def nvcc_version(nvcc: str) -> Optional[str]:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def _torch_cuda_home() -> Optional[str]:
    try:
        from torch.utils import cpp_extension
    except Exception:  # noqa: BLE001 - any import failure just means "no answer from torch"
        return None
    return cpp_extension.CUDA_HOME


def wheel_runtime_libs() -> List[str]:
    """Library folders of the nvidia-* wheels beside torch (``nvidia/cu13/lib``, ``nvidia/*/lib``)."""
    dirs = []
    for base in sys.path:
        for pattern in ("nvidia/cu*/lib", "nvidia/cuda_runtime/lib", "nvidia/*/lib"):
            for d in sorted(glob.glob(os.path.join(base, pattern))):
                if glob.glob(os.path.join(d, "libcudart.so*")) and d not in dirs:
                    dirs.append(d)
    return dirs


def candidate_roots():
    """(how, root) pairs to try, in order; a root may be None or a non-toolkit (checked later)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        yield f"${var}", os.environ.get(var)
    nvcc = shutil.which("nvcc")
    if nvcc:
        yield "nvcc on PATH", os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        yield "nvcc on PATH (its dry run)", nvcc_reported_root(nvcc)
    yield "torch.utils.cpp_extension.CUDA_HOME", _torch_cuda_home()
    yield "/usr/local/cuda", "/usr/local/cuda"


def find_cuda_toolkit(tried: Optional[list] = None) -> Optional[CudaToolkit]:
    """The first real CUDA toolkit (headers + the nvcc driver itself) among ``candidate_roots``;
    ``tried`` collects ``how: root`` of each miss, for the error message."""
    for how, root in candidate_roots():
        if is_toolkit_root(root):
            root = os.path.realpath(root)
            nvcc = os.path.join(root, "bin", "nvcc")
            return CudaToolkit(root=root, nvcc=nvcc, version=nvcc_version(nvcc) or "unknown",
                               found_by=how, runtime_libs=wheel_runtime_libs())
        if tried is not None:
            tried.append(f"{how}: {root or 'not set'}")
    return None


# --- what to build ------------------------------------------------------------------------------

def want_cuda(torch_cuda: Optional[str]) -> bool:
    forced = os.environ.get("DUALRPO_BUILD_CUDA", "")
    if forced not in ("", "0", "1"):
        raise BuildError(f"DUALRPO_BUILD_CUDA={forced!r}: use 0 or 1")
    return forced == "1" or (forced == "" and bool(torch_cuda))


def resolve_cuda(torch_cuda: Optional[str]) -> Optional[CudaToolkit]:
    """The toolkit to build the CUDA kernel with, None for a CPU-only build; BuildError when the
    CUDA kernel is wanted and cannot be built."""
    if not want_cuda(torch_cuda):
        return None
    if not torch_cuda:
        raise BuildError("DUALRPO_BUILD_CUDA=1 but the installed torch is a CPU build; install a CUDA torch "
                         "or unset DUALRPO_BUILD_CUDA")
    tried: list = []
    tk = find_cuda_toolkit(tried)
    if tk is None:
        raise BuildError(f"torch is a CUDA {torch_cuda} build but no CUDA toolkit "
                         f"(include/cuda_runtime.h + bin/nvcc) was found; looked at " + "; ".join(tried)
                         + ". Set CUDA_HOME to the toolkit root, or " + OPT_OUT)
    if tk.version.split(".")[0] != torch_cuda.split(".")[0]:
        raise BuildError(f"the CUDA toolkit at {tk.root} is {tk.version} but torch was built with CUDA {torch_cuda}: "
                         f"the kernel would link another CUDA runtime major. Point CUDA_HOME at a "
                         f"{torch_cuda.split('.')[0]}.x toolkit, or " + OPT_OUT)
    return tk


def check_compilers() -> None:
    missing = [tool for tool in ("cmake",) if shutil.which(tool) is None]
    cxx = (os.environ.get("CXX") or "").split()[:1] or [c for c in ("c++", "g++", "clang++") if shutil.which(c)][:1]
    if not cxx or shutil.which(cxx[0]) is None:
        missing.append("a C++ compiler (c++, g++ or clang++, or $CXX)")
    if missing:
        raise BuildError(f"cannot build the C++ kernel: {' and '.join(missing)} not found (pip install cmake; "
                         f"apt-get install g++). Or set DUALRPO_BUILD_EXT=0 to install without compiled "
                         f"kernels (token_stats then runs its slower pure-torch path)")


# --- setuptools glue ----------------------------------------------------------------------------

class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])  # sources are CMake's business


def cmake_args(out: str, toolkit: Optional[CudaToolkit]) -> List[str]:
    import pybind11

    args = [
        "-DCMAKE_BUILD_TYPE=Release",
        f"-DPython_EXECUTABLE={sys.executable}",
        f"-DCMAKE_PREFIX_PATH={pybind11.get_cmake_dir()}",
        f"-DDUALRPO_EXT_DIR={os.path.dirname(out)}",
        f"-DDUALRPO_EXT_FILE={os.path.basename(out)}",
        f"-DDUALRPO_WITH_CUDA={'ON' if toolkit else 'OFF'}",
        f"-DDUALRPO_CPU_ARCH={os.environ.get('DUALRPO_CPU_ARCH', 'native')}",
    ]
    if toolkit:
        args += [f"-DCMAKE_CUDA_COMPILER={toolkit.nvcc}", f"-DCUDAToolkit_ROOT={toolkit.root}",
                 f"-DDUALRPO_CUDA_RUNTIME_DIRS={';'.join(toolkit.runtime_libs)}"]
    return args


class CMakeBuild(build_ext):
    """Configure + build with CMake; output file exactly where setuptools expects it."""

    def build_extensions(self) -> None:
        if os.environ.get("DUALRPO_BUILD_EXT", "1") == "0":
            print("[dualrpo_build] DUALRPO_BUILD_EXT=0: installing without compiled kernels", file=sys.stderr)
            self.extensions = []
            return
        for ext in self.extensions:
            try:
                self.build_extension(ext)
            except (BuildError, subprocess.CalledProcessError, OSError) as exc:
                bar = "!" * 78
                raise SystemExit(f"\n{bar}\n[dualrpo_build] building {ext.name} FAILED: {exc}\n"
                                 f"[dualrpo_build] the install stops here so the kernel is not lost silently.\n"
                                 f"[dualrpo_build] To go on without it: {OPT_OUT}.\n{bar}") from exc

    def build_extension(self, ext: Extension) -> None:
        import torch

        check_compilers()
        toolkit = resolve_cuda(torch.version.cuda)
        out = os.path.abspath(self.get_ext_fullpath(ext.name))
        build_dir = os.path.join(os.path.abspath(self.build_temp), ext.name)
        os.makedirs(build_dir, exist_ok=True)
        what = f"cpu+cuda {toolkit.version} at {toolkit.root} ({toolkit.found_by})" if toolkit else "cpu"
        print(f"[dualrpo_build] cmake ({what}) -> {out}", file=sys.stderr)
        jobs = os.environ.get("DUALRPO_BUILD_JOBS") or str(min(4, os.cpu_count() or 1))
        subprocess.run(["cmake", "-S", HERE, "-B", build_dir, *cmake_args(out, toolkit)], check=True)
        subprocess.run(["cmake", "--build", build_dir, "-j", jobs], check=True)
        if not os.path.exists(out):
            raise BuildError(f"cmake finished but {out} is missing")


def ext_modules():
    return [CMakeExtension("dualrpo_mcore._C")]


def cmdclass():
    return {"build_ext": CMakeBuild}


if __name__ == "__main__":  # `python dualrpo_build.py`: what the build would use, without building
    import torch

    print(f"torch {torch.__version__} (CUDA {torch.version.cuda})")
    misses: list = []
    found = find_cuda_toolkit(misses)
    print(f"CUDA toolkit: {found}" if found else "CUDA toolkit: none")
    for miss in misses:
        print(f"  not a toolkit: {miss}")
