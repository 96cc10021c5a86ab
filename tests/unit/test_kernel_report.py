"""Which kernel path each compiled op takes, as `train`/`bench`/`demo` print it at start."""
import io
import os

import pytest
import torch

from dualrpo_mcore import cli
from dualrpo_mcore.ops import _ext, report

HAS_EXT = _ext.load_extension() is not None


@pytest.fixture(autouse=True)
def _auto_backend(monkeypatch):
    monkeypatch.delenv(_ext.BACKEND_ENV, raising=False)
    monkeypatch.delenv("RANK", raising=False)


@pytest.mark.skipif(not HAS_EXT, reason="dualrpo_mcore._C is not built here: the C++ path cannot be reported")
def test_cpu_reports_the_cpp_kernel_with_no_warning():
    paths = report.kernel_paths(torch.device("cpu"))
    assert [p.op for p in paths] == list(report.OPS)
    assert all(p.path == "C++" and p.is_fastest for p in paths)
    lines = report.describe(paths)
    assert len(lines) == 1 and "C++" in lines[0] and "WARNING" not in lines[0]


def test_forced_torch_backend_is_reported_with_its_cause(monkeypatch):
    monkeypatch.setenv(_ext.BACKEND_ENV, "torch")
    paths = report.kernel_paths(torch.device("cpu"))
    assert all(p.path == "torch" and not p.is_fastest for p in paths)
    warning = report.describe(paths)[1]
    assert warning.startswith("WARNING") and _ext.BACKEND_ENV in warning and "not C++" in warning


def test_missing_kernel_warns_with_the_load_error(monkeypatch):
    monkeypatch.setattr(report, "_registered", lambda op, dev: False)
    monkeypatch.setattr(_ext, "load_extension", lambda: None)
    monkeypatch.setattr(_ext, "load_error", lambda: "ImportError: no _C here")
    lines = report.describe(report.kernel_paths(torch.device("cpu")))
    assert "torch" in lines[0]
    assert len(lines) == 2 and "no _C here" in lines[1] and "pip install --no-build-isolation" in lines[1]


def test_cuda_device_without_cuda_kernel_is_not_the_fastest():
    paths = report.kernel_paths(torch.device("cuda"))
    if all(p.path == "CUDA" for p in paths):
        pytest.skip(reason="this build registers the CUDA kernel: nothing to warn about")
    assert all(p.fastest == "CUDA" and not p.is_fastest for p in paths)
    assert any(line.startswith("WARNING") and "not CUDA" in line for line in report.describe(paths))


def test_only_rank_zero_prints(monkeypatch):
    buf = io.StringIO()
    monkeypatch.setenv("RANK", "1")
    report.log_kernel_paths("train", stream=buf)
    assert buf.getvalue() == ""
    monkeypatch.setenv("RANK", "0")
    report.log_kernel_paths("train", stream=buf)
    assert buf.getvalue().startswith("[dualrpo train] kernels on ")


@pytest.mark.parametrize("command", cli.KERNEL_REPORT)
def test_commands_print_kernel_paths_at_start(command, capsys, monkeypatch):
    ran = []
    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    sub = next(a for a in parser._actions if a.dest == "command")
    sub.choices[command].set_defaults(_run=lambda args: ran.append(args.command) or 0)
    argv = {"train": ["train", "--data", "d", "--out", "o"], "bench": ["bench"], "demo": ["demo"]}[command]
    assert cli.main(argv) == 0 and ran == [command]
    assert f"[dualrpo {command}] kernels on " in capsys.readouterr().err


def test_cuda_kernel_built_where_the_leg_requires_it():
    # scripts/test_py312.sh sets this when it built the CUDA kernel (a toolkit was found): the module
    # must then carry it, even though no GPU can run it here.
    if os.environ.get("DUALRPO_REQUIRE_CUDA_BUILD") != "1":
        pytest.skip(reason="DUALRPO_REQUIRE_CUDA_BUILD is not 1: this install may be CPU-only")
    ext = _ext.load_extension()
    assert ext is not None, _ext.load_error()
    assert ext.has_cuda()
    assert torch._C._dispatch_has_kernel_for_dispatch_key("dualrpo::partials", "CUDA")
