"""The extension build (dualrpo_build.py): the real CUDA toolkit behind an nvcc wrapper, and failures
that stop the install with the reason and the opt-out instead of dropping the kernel silently."""
import importlib.util
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_build():
    """dualrpo_build.py lives at the repository root, beside setup.py, and is not installed: load it by
    path (a sys.path entry for the root would let the source tree shadow the installed package)."""
    spec = importlib.util.spec_from_file_location("dualrpo_build", ROOT / "dualrpo_build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there while being built
    spec.loader.exec_module(module)
    return module


build = _load_build()


def _exe(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def fake_toolkit(root: Path, release: str = "13.0") -> Path:
    """A toolkit tree whose nvcc answers --version and --dryrun the way the real driver does."""
    (root / "include").mkdir(parents=True)
    (root / "include" / "cuda_runtime.h").write_text("")
    _exe(root / "bin" / "nvcc", f"""#!/bin/sh
case "$*" in
  *--dryrun*) echo "#\\$ _HERE_={root}/bin"; echo "#\\$ TOP={root}/bin/.." ;;
  *--version*) echo "Cuda compilation tools, release {release}, V{release}.88" ;;
esac
""")
    return root


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No CUDA_HOME, a PATH with only what the test puts there, torch and /usr/local/cuda silent."""
    for var in ("CUDA_HOME", "CUDA_PATH", "DUALRPO_BUILD_CUDA", "DUALRPO_BUILD_EXT"):
        monkeypatch.delenv(var, raising=False)
    bindir = tmp_path / "path"
    bindir.mkdir()
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}/usr/bin{os.pathsep}/bin")
    monkeypatch.setattr(build, "_torch_cuda_home", lambda: None)
    real_roots = build.candidate_roots

    def roots():
        for how, root in real_roots():
            if how != "/usr/local/cuda":
                yield how, root
    monkeypatch.setattr(build, "candidate_roots", roots)
    return bindir


def test_wrapper_script_resolves_to_the_real_toolkit(isolated, tmp_path):
    root = fake_toolkit(tmp_path / "cuda-13.0")
    _exe(isolated / "nvcc", f'#!/bin/sh\nexec {root}/bin/nvcc "$@"\n')  # what this machine's PATH has
    tried = []
    tk = build.find_cuda_toolkit(tried)
    assert tk is not None and tk.root == str(root.resolve()) and tk.version == "13.0"
    assert tk.found_by == "nvcc on PATH (its dry run)"
    assert any(str(isolated.parent) in t for t in tried)  # the wrapper's parent was looked at and refused


def test_cuda_home_wins_and_a_bad_one_is_skipped(isolated, tmp_path, monkeypatch):
    root = fake_toolkit(tmp_path / "tk")
    monkeypatch.setenv("CUDA_HOME", str(root))
    assert build.find_cuda_toolkit().found_by == "$CUDA_HOME"
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))  # not a toolkit
    _exe(isolated / "nvcc", f'#!/bin/sh\nexec {root}/bin/nvcc "$@"\n')
    assert build.find_cuda_toolkit().root == str(root.resolve())


def test_cuda_torch_without_toolkit_fails_with_the_opt_outs(isolated):
    with pytest.raises(build.BuildError) as err:
        build.resolve_cuda("13.0")
    msg = str(err.value)
    assert "no CUDA toolkit" in msg and "DUALRPO_BUILD_CUDA=0" in msg and "DUALRPO_BUILD_EXT=0" in msg


def test_toolkit_of_another_cuda_major_is_refused(isolated, tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_HOME", str(fake_toolkit(tmp_path / "tk12", release="12.8")))
    with pytest.raises(build.BuildError, match="12.8 but torch was built with CUDA 13.0"):
        build.resolve_cuda("13.0")


def test_build_cuda_switch(isolated, tmp_path, monkeypatch):
    assert build.resolve_cuda(None) is None  # CPU torch: C++ kernel only
    monkeypatch.setenv("DUALRPO_BUILD_CUDA", "0")
    assert build.resolve_cuda("13.0") is None
    monkeypatch.setenv("DUALRPO_BUILD_CUDA", "1")
    with pytest.raises(build.BuildError, match="CPU build"):
        build.resolve_cuda(None)
    monkeypatch.setenv("DUALRPO_BUILD_CUDA", "yes")
    with pytest.raises(build.BuildError, match="use 0 or 1"):
        build.resolve_cuda("13.0")


def test_missing_compiler_fails_with_the_opt_out(isolated, monkeypatch):
    monkeypatch.setenv("PATH", str(isolated))  # neither cmake nor a C++ compiler
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(build.BuildError) as err:
        build.check_compilers()
    assert "cmake" in str(err.value) and "C++ compiler" in str(err.value) and "DUALRPO_BUILD_EXT=0" in str(err.value)


def _command(monkeypatch, fail_with=None):
    from setuptools import Distribution

    cmd = build.CMakeBuild(Distribution({"name": "x", "ext_modules": build.ext_modules()}))
    cmd.ensure_finalized()
    calls = []

    def fake_build(ext):
        calls.append(ext.name)
        if fail_with:
            raise fail_with
    monkeypatch.setattr(cmd, "build_extension", fake_build)
    return cmd, calls


def test_failed_build_stops_the_install_with_reason_and_opt_out(monkeypatch):
    monkeypatch.delenv("DUALRPO_BUILD_EXT", raising=False)
    cmd, _ = _command(monkeypatch, fail_with=build.BuildError("nvcc exploded"))
    with pytest.raises(SystemExit) as err:
        cmd.build_extensions()
    msg = str(err.value)
    assert "nvcc exploded" in msg and "DUALRPO_BUILD_CUDA=0" in msg and "DUALRPO_BUILD_EXT=0" in msg


def test_opt_out_installs_without_the_extension(monkeypatch):
    monkeypatch.setenv("DUALRPO_BUILD_EXT", "0")
    cmd, calls = _command(monkeypatch, fail_with=AssertionError("must not build"))
    cmd.build_extensions()
    assert calls == [] and cmd.extensions == []


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on PATH: nothing real to resolve")
def test_this_machines_nvcc_leads_to_a_toolkit():
    tk = build.find_cuda_toolkit()
    assert tk is not None and os.path.isfile(os.path.join(tk.root, "include", "cuda_runtime.h"))
    assert os.path.realpath(tk.nvcc) == os.path.realpath(os.path.join(tk.root, "bin", "nvcc"))
