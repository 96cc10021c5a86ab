"""``dualrpo env``: the environment report to paste into a bug report.

Like ``python -m torch.utils.collect_env`` or ``vllm collect-env``, and for the same reason: most
"it breaks here" reports come down to a version, a GPU or a kernel that did not load. It prints the
versions of Python, torch (and its CUDA), megatron-core, Transformer Engine, SGLang, transformers
and nemo-run; the GPUs; which kernel path each compiled op takes; and which extras import. It exits
1 when an installed package is outside what the installed dualrpo-mcore declares (its own
metadata, so the check cannot drift from setup.py), naming the package and the range.

Versions are read from package metadata, not by importing the packages: importing Transformer
Engine or SGLang on the wrong machine can itself be the failure being reported. Extras are then
imported in a subprocess each, so one that crashes the interpreter is reported, not fatal.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional

DIST = "dualrpo-mcore"
# Shown in this order whatever their state; every other requirement is checked but listed only on a problem.
HEADLINE = ("torch", "megatron-core", "transformer-engine", "sglang", "transformers", "nemo-run")
# Transformer Engine that a megatron-core minor declares (its wheel's METADATA). 0.17 to 0.19 declare
# no bound, so for them the ``te`` extra's range is the only one.
TE_BY_MCORE = {"0.16": ">=2.9,<2.12"}
# What each extra must be able to import to be usable.
EXTRA_IMPORTS = {"test": ["pytest", "hypothesis", "pycocotools"], "sglang": ["sglang"],
                 "te": ["transformer_engine.pytorch"], "launch": ["nemo_run"]}


@dataclass
class Check:
    name: str
    installed: Optional[str]
    spec: str
    extra: str = ""
    """'' for a core requirement, else the extra that brings it."""
    problem: str = ""


def _canon(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def spec_text(specifier) -> str:
    """``>=0.16.1,<0.20`` rather than packaging's ``<0.20,>=0.16.1``: lower bound first, as people write it."""
    parts = sorted((str(s) for s in specifier), key=lambda s: (not s.startswith(">"), s))
    return ",".join(parts) or "any"


def installed_version(name: str) -> Optional[str]:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def requirement_extra(req, extras: Iterable[str]) -> Optional[str]:
    """'' when ``req`` applies without extras here, the first extra under which it applies, or None
    (its marker excludes this interpreter)."""
    if req.marker is None or req.marker.evaluate({"extra": ""}):
        return ""
    return next((e for e in extras if req.marker.evaluate({"extra": e})), None)


def check_versions(requirements: List[str], extras: List[str], version_of=None) -> List[Check]:
    """One :class:`Check` per requirement that applies to this interpreter; ``problem`` says what is wrong.

    A missing core requirement is a problem; a missing optional one is not (the extra is just unused).
    """
    from packaging.requirements import Requirement

    version_of = version_of or installed_version
    checks: Dict[str, Check] = {}
    for line in requirements:
        req = Requirement(line)
        extra = requirement_extra(req, extras)
        name = _canon(req.name)
        if extra is None or (name in checks and checks[name].extra == ""):
            continue
        have = version_of(req.name)
        chk = Check(name, have, spec_text(req.specifier), extra)
        if have is None:
            chk.problem = "" if extra else f"{name} is not installed (required: {chk.spec})"
        elif not req.specifier.contains(have, prereleases=True):
            where = f"the [{extra}] extra" if extra else DIST
            chk.problem = f"{name} {have} is outside the supported range {chk.spec} ({where})"
        checks[name] = chk
    _check_te_against_mcore(checks, version_of)
    return list(checks.values())


def _check_te_against_mcore(checks: Dict[str, Check], version_of) -> None:
    from packaging.specifiers import SpecifierSet

    mcore, te = version_of("megatron-core"), version_of("transformer-engine")
    if not (mcore and te):
        return
    spec = TE_BY_MCORE.get(".".join(mcore.split(".")[:2]))
    chk = checks.setdefault("transformer-engine", Check("transformer-engine", te, spec or "any", "te"))
    if spec and not chk.problem and not SpecifierSet(spec).contains(te, prereleases=True):
        chk.spec = spec
        chk.problem = f"transformer-engine {te} is outside {spec}, the range megatron-core {mcore} declares"


def own_requirements():
    """(requirements, extras) the installed dualrpo-mcore declares, or None when it is not installed."""
    try:
        dist = md.distribution(DIST)
    except md.PackageNotFoundError:
        return None
    return list(dist.requires or []), list(dist.metadata.get_all("Provides-Extra") or [])


def gpu_lines() -> List[str]:
    import torch

    if not torch.cuda.is_available():
        return ["none visible to torch" + (" (torch is a CPU build)" if not torch.version.cuda else "")]
    lines = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        lines.append(f"{i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB")
    smi = shutil.which("nvidia-smi")
    if smi:
        res = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        if res.returncode == 0 and res.stdout.strip():
            lines.append(f"driver {res.stdout.splitlines()[0].strip()}")
    return lines


def kernel_lines() -> List[str]:
    import torch

    from dualrpo_mcore.ops import _ext
    from dualrpo_mcore.ops.report import describe, kernel_paths

    ext = _ext.load_extension()
    lines = [f"dualrpo_mcore._C: {ext.__file__} (CUDA kernel compiled in: {'yes' if ext.has_cuda() else 'no'})"
             if ext is not None else f"dualrpo_mcore._C: not loaded ({_ext.load_error()})"]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        lines += describe(kernel_paths(torch.device(dev)))
    nvcc = shutil.which("nvcc")
    lines.append(f"nvcc on PATH: {nvcc or 'none'}; CUDA_HOME={os.environ.get('CUDA_HOME', '(unset)')}")
    return lines


def extra_lines(extras: List[str], timeout: float = 120.0) -> List[str]:
    """Whether each extra's modules import, each tried in a fresh interpreter."""
    lines = []
    for extra in extras:
        mods = EXTRA_IMPORTS.get(extra)
        if not mods:
            continue
        code = "; ".join(f"import {m}" for m in mods)
        try:
            res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
            ok, why = res.returncode == 0, (res.stderr.strip().splitlines() or ["exit %d" % res.returncode])[-1]
        except subprocess.TimeoutExpired:
            ok, why = False, f"import took over {timeout:.0f}s"
        lines.append(f"[{extra}] {'importable' if ok else 'not importable: ' + why[:200]}")
    return lines


def report(with_extras: bool = True) -> tuple:
    """(lines, problems) of the whole report."""
    import torch

    own = own_requirements()
    lines = [f"{DIST} {installed_version(DIST) or '(not installed)'}",
             f"Python {platform.python_version()} ({sys.executable}) on {platform.platform()}",
             f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}, "
             f"cuDNN {torch.backends.cudnn.version() if torch.version.cuda else 'none'})"]
    problems: List[str] = []
    if own is None:
        problems.append(f"{DIST} is not installed (pip install --no-build-isolation -e .): no ranges to check")
        checks: List[Check] = []
    else:
        checks = check_versions(*own)
    by_name = {c.name: c for c in checks}
    lines.append("packages (installed / supported):")
    for name in HEADLINE:
        c = by_name.get(name) or Check(name, installed_version(name), "-")
        tag = f" [{c.extra}]" if c.extra else ""
        lines.append(f"  {name:<20} {c.installed or 'not installed':<16} {c.spec}{tag}"
                     + (f"   <-- {c.problem}" if c.problem else ""))
    lines += [f"  {c.name:<20} {c.installed or 'not installed':<16} {c.spec}   <-- {c.problem}"
              for c in checks if c.problem and c.name not in HEADLINE]
    problems += [c.problem for c in checks if c.problem]
    lines += ["GPUs:"] + [f"  {g}" for g in gpu_lines()]
    lines += ["kernels:"] + [f"  {k}" for k in kernel_lines()]
    if with_extras and own is not None:
        lines += ["extras:"] + [f"  {e}" for e in extra_lines(own[1])]
    return lines, problems


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-extras", action="store_true",
                        help="skip importing each extra (each in its own interpreter; SGLang's takes seconds)")


def run(args) -> int:
    lines, problems = report(with_extras=not args.no_extras)
    print("\n".join(lines))
    if problems:
        print("\nunsupported:", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    return 0
