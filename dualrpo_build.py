"""Build helper imported by setup.py: the csrc/ extension ``dualrpo_mcore._C`` through CMake.

Works for ``pip install --no-build-isolation .`` and ``... -e .`` (setuptools builds into
build/ and, when editable, copies the module next to the sources). Environment knobs:

  DUALRPO_BUILD_CUDA=0|1   force the CUDA kernels off/on (default: on when torch.version.cuda
                           is set and nvcc is found)
  DUALRPO_CPU_ARCH=...     -march for the CPU kernel (default ``native``: the package is built
                           where it runs; set e.g. ``x86-64-v3`` for a portable wheel, or empty)
  DUALRPO_BUILD_STRICT=1   a failed extension build fails the install (default: warn loudly and
                           install without it; dualrpo_mcore.ops then uses its torch fallback,
                           and the test gated by DUALRPO_REQUIRE_EXT=1 catches it in CI)
  DUALRPO_BUILD_JOBS=N     parallel compile jobs (default: CPU count, at most 4)
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])  # sources are CMake's business


def _want_cuda(torch) -> bool:
    forced = os.environ.get("DUALRPO_BUILD_CUDA")
    if forced is not None and forced != "":
        return forced == "1"
    return bool(torch.version.cuda) and _nvcc() is not None


def _nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


class CMakeBuild(build_ext):
    """Configure + build with CMake; output file exactly where setuptools expects it."""

    def build_extensions(self) -> None:
        built = []
        for ext in self.extensions:
            try:
                self.build_extension(ext)
                built.append(ext)
            except Exception as exc:  # noqa: BLE001 - decide below whether it is fatal
                if os.environ.get("DUALRPO_BUILD_STRICT") == "1":
                    raise
                bar = "!" * 78
                print(f"\n{bar}\n[dualrpo_build] building {ext.name} FAILED: {exc}\n"
                      f"[dualrpo_build] installing without it; token_stats uses the torch fallback."
                      f"\n[dualrpo_build] set DUALRPO_BUILD_STRICT=1 to make this fatal.\n{bar}\n",
                      file=sys.stderr)
        self.extensions = built  # so the editable copy step does not look for a missing file

    def build_extension(self, ext: Extension) -> None:
        import pybind11
        import torch

        out = os.path.abspath(self.get_ext_fullpath(ext.name))
        build_dir = os.path.join(os.path.abspath(self.build_temp), ext.name)
        os.makedirs(build_dir, exist_ok=True)
        cuda = _want_cuda(torch)
        args = [
            f"-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path};{pybind11.get_cmake_dir()}",
            f"-DDUALRPO_EXT_DIR={os.path.dirname(out)}",
            f"-DDUALRPO_EXT_FILE={os.path.basename(out)}",
            f"-DDUALRPO_WITH_CUDA={'ON' if cuda else 'OFF'}",
            f"-DDUALRPO_CPU_ARCH={os.environ.get('DUALRPO_CPU_ARCH', 'native')}",
        ]
        if cuda:
            args.append(f"-DCMAKE_CUDA_COMPILER={_nvcc()}")
        jobs = os.environ.get("DUALRPO_BUILD_JOBS") or str(min(4, os.cpu_count() or 1))
        print(f"[dualrpo_build] cmake ({'cpu+cuda' if cuda else 'cpu'}) -> {out}", file=sys.stderr)
        subprocess.run(["cmake", "-S", HERE, "-B", build_dir, *args], check=True)
        subprocess.run(["cmake", "--build", build_dir, "-j", jobs], check=True)
        if not os.path.exists(out):
            raise RuntimeError(f"cmake finished but {out} is missing")


def ext_modules():
    return [CMakeExtension("dualrpo_mcore._C")]


def cmdclass():
    return {"build_ext": CMakeBuild}


if __name__ == "__main__":  # handy for a quick local build: python dualrpo_build.py
    print(sysconfig.get_config_var("EXT_SUFFIX"))
