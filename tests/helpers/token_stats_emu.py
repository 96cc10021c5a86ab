"""Harness for running csrc/token_stats_cuda.cu on the CPU through csrc/emu/ (used by
unit/test_token_stats_cuda_emu.py and unit/test_token_stats_cuda_glue.py): build the driver with
g++, encode launch records, decode results, and check them against the float64 reference after the
same merge the tensor-parallel path uses.
"""
from __future__ import annotations

import shutil
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from dualrpo_mcore.ops.token_stats import merge
from helpers.close import mismatches
from helpers.token_stats_ref import IGNORE, reference_with_grads

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
EMU = CSRC / "emu"
KERNEL = CSRC / "token_stats_cuda.cu"
GXX = shutil.which("g++")

DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
BASE_FLAGS = ["-std=c++17", "-U_FORTIFY_SOURCE", "-Wall", "-Wextra", f"-I{EMU / 'include'}", f"-I{CSRC}"]
# Small enough that every case walks the grid-stride loop (several rows per block).
SMALL_GRID = ["-DDUALRPO_MAX_BLOCKS=3"]
# A misaligned 16-byte pack or an overrun of a per-thread array aborts the run.
CHECKS = ["-fsanitize=alignment,bounds", "-fno-sanitize-recover=all"]
ASAN = ["-O0", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"]

FORWARD, REVERSE, RANDOM = 0, 1, 2


def compile_cmd(out: Path, source: Path, flags: Sequence[str] = ()) -> List[str]:
    """g++ -c of one translation unit; a .cu is compiled as C++ (the emulated headers come first)."""
    lang = ["-x", "c++"] if source.suffix == ".cu" else []
    return [GXX, *BASE_FLAGS, *flags, "-c", *lang, str(source), "-o", str(out)]


def link_cmd(out: Path, objects: Sequence[Path], flags: Sequence[str] = ()) -> List[str]:
    return [GXX, *flags, *map(str, objects), "-o", str(out)]


def build_all(jobs, parallel: int = 2, timeout: float = 240):
    """Run ``[(name, cmd)]`` with ``parallel`` at a time; return {name: (returncode, stderr)}."""
    pending, running, done = list(jobs), [], {}
    while pending or running:
        while pending and len(running) < parallel:
            name, cmd = pending.pop(0)
            running.append((name, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                   text=True)))
        name, proc = running.pop(0)
        _, err = proc.communicate(timeout=timeout)
        done[name] = (proc.returncode, err)
    return done


@dataclass
class Case:
    name: str
    z: torch.Tensor                 # [rows, vocab + pad], dtype of the kernel; padding holds nan
    labels: torch.Tensor
    ref: Optional[torch.Tensor]
    vocab: int
    temperature: float
    bounds: Sequence[int]           # shard boundaries over the padded columns
    stride_extra: int = 0           # row stride = shard width + this (gaps hold nan)
    offset: int = 0                 # elements between a 16-byte boundary and the first row
    uniform_rows: Sequence[int] = ()
    up: List[torch.Tensor] = field(default_factory=list)

    def shards(self):
        for lo, hi in zip(self.bounds, self.bounds[1:]):
            yield lo, hi, max(0, min(hi, self.vocab) - lo)


def _bytes(t: torch.Tensor) -> bytes:
    t = t.contiguous()
    return (t.view(torch.int16) if t.element_size() == 2 else t).numpy().tobytes()


def _shard_buffer(t: torch.Tensor, lo: int, hi: int, ld: int, offset: int) -> torch.Tensor:
    rows, w = t.shape[0], hi - lo
    flat = torch.full((offset + max(rows - 1, 0) * ld + w,), float("nan"), dtype=t.dtype)
    for i in range(rows):
        flat[offset + i * ld: offset + i * ld + w] = t[i, lo:hi]
    return flat


def _header(kind, dtype, rows, n_cols, ld, off, n_real, vstart, vsize, has_ref, ks, ldd, inv_t):
    return struct.pack("<16qd", kind, dtype, rows, n_cols, ld, off, n_real, vstart, vsize, has_ref, ks,
                       ldd, 0, 0, 0, 0, inv_t)


def kernel_stats(case: Case):
    """(stats [T, 3 or 5] float32, grads [T, 4] float32) as the merge would hand them to backward,
    from x in the kernel's own fp32 arithmetic (so M is bitwise the kernel's max)."""
    inv_t = torch.tensor(1.0 / case.temperature, dtype=torch.float32)
    x32 = case.z[:, :case.vocab].float() * inv_t
    big_m = x32.amax(1)
    d = x32.double() - big_m.double()[:, None]
    log_s = torch.logsumexp(d, 1)
    p = torch.exp(d - log_s[:, None])
    zero = torch.zeros((), dtype=torch.float64)
    cols = [big_m.double(), log_s, torch.where(p > 0, p * d, zero).sum(1)]
    if case.ref is not None:
        r32 = case.ref[:, :case.vocab].float() * inv_t
        big_mr = r32.amax(1)
        dr = r32.double() - big_mr.double()[:, None]
        cols += [big_mr.double(), torch.where(p > 0, p * (d - dr), zero).sum(1)]
    ignore = case.labels == IGNORE
    g_lp = torch.where(ignore, zero, case.up[0])
    g_kl = case.up[3] if case.ref is not None else torch.zeros_like(case.up[3])
    grads = torch.stack([g_lp, case.up[1], case.up[2], g_kl], 1)
    return torch.stack(cols, 1).float(), grads.float()


def encode(cases: Sequence[Case], order: int = FORWARD, seed: int = 0, extra: Sequence[bytes] = ()) -> bytes:
    """One partials record and one grad record per shard of every case, then ``extra`` records."""
    recs = []
    for c in cases:
        dt = DTYPE_CODE[c.z.dtype]
        stats, grads = kernel_stats(c)
        for lo, hi, n_real in c.shards():
            w, rows = hi - lo, c.z.shape[0]
            ld = w + c.stride_extra
            payload = _bytes(_shard_buffer(c.z, lo, hi, ld, c.offset))
            if c.ref is not None:
                payload += _bytes(_shard_buffer(c.ref, lo, hi, ld, c.offset))
            payload += c.labels.numpy().astype("<i8").tobytes()
            has_ref = int(c.ref is not None)
            recs.append(_header(0, dt, rows, w, ld, c.offset, n_real, lo, c.vocab, has_ref, 0, 0,
                                1.0 / c.temperature) + payload)
            # dz gets the stride of z: a 16-byte z row is then a 16-byte dz row (the vector path)
            recs.append(_header(1, dt, rows, w, ld, c.offset, n_real, lo, c.vocab, has_ref, stats.shape[1], ld,
                                1.0 / c.temperature) + payload + _bytes(stats) + _bytes(grads))
    return case_file(recs + list(extra), order, seed)


def case_file(records: Sequence[bytes], order: int = FORWARD, seed: int = 0) -> bytes:
    return b"TSEMU1\0\0" + struct.pack("<3q", len(records), order, seed) + b"".join(records)


def dry_run_record(grad: bool, rows: int, n_cols: int, dtype=torch.bfloat16) -> bytes:
    return _header(3 if grad else 2, DTYPE_CODE[dtype], rows, n_cols, n_cols, 0, n_cols, 0, n_cols, 0, 3,
                   n_cols, 1.0)


def conversion_record(values: torch.Tensor) -> bytes:
    v = values.float().contiguous()
    return _header(4, 0, 0, v.numel(), 0, 0, 0, 0, 1, 0, 0, 0, 1.0) + v.numpy().tobytes()


@dataclass
class Result:
    err: int
    msg: str
    launches: List[tuple]
    payload: bytes


def decode(data: bytes) -> List[Result]:
    out, pos = [], 0

    def i64():
        nonlocal pos
        (v,) = struct.unpack_from("<q", data, pos)
        pos += 8
        return v

    def blob():
        nonlocal pos
        n = i64()
        b = data[pos:pos + n]
        pos += n
        return b

    while pos < len(data):
        err, msg = i64(), blob().decode(errors="replace")
        launches = [(i64(), i64()) for _ in range(i64())]
        out.append(Result(err, msg, launches, blob()))
    return out


def run(exe: Path, blob: bytes, tmp: Path, timeout: float = 120):
    """(returncode, stderr, results) of one driver run over an encoded case file."""
    cases, out = tmp / f"{exe.name}.cases", tmp / f"{exe.name}.out"
    cases.write_bytes(blob)
    if out.exists():
        out.unlink()
    proc = subprocess.run([str(exe), str(cases), str(out)], capture_output=True, text=True, timeout=timeout)
    results = decode(out.read_bytes()) if proc.returncode == 0 and out.exists() else []
    return proc.returncode, proc.stderr, results


def _from_payload(payload: bytes, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.float32:
        return torch.frombuffer(bytearray(payload), dtype=torch.float32)
    return torch.frombuffer(bytearray(payload), dtype=torch.int16).view(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def _close(got, want, rtol, atol, what, bad):
    """Like helpers.close.assert_close, but collects every failure so one run reports them all."""
    got = got.double()
    wrong = mismatches(got, want, rtol, atol)  # nan counts as wrong
    if bool(wrong.any()):
        idx = torch.nonzero(wrong)[0].tolist()
        bad.append(f"{what}: {int(wrong.sum())} wrong, first at {idx}: got {float(got[tuple(idx)])}, "
                   f"want {float(want[tuple(idx)])}")


def check(cases: Sequence[Case], results: Sequence[Result]) -> List[str]:
    """Every disagreement with the float64 reference, as readable lines (empty = all good).

    Forward: the shards' partials merged by ``ops.token_stats.merge`` (the tensor-parallel code),
    against logprob / entropy / self-certainty / KL of the full row, tolerance relative to the
    row's largest |x|; uniform rows must give self-certainty exactly 0. Backward: the shards' dz
    side by side against the float64 gradient, padding columns exactly 0.
    """
    bad, it = [], iter(results)
    for c in cases:
        rows, k = c.z.shape[0], (9 if c.ref is not None else 6)
        parts, dz, ok = [], [], True
        for lo, hi, _ in c.shards():
            rp, rg = next(it), next(it)
            for kind, r in (("partials", rp), ("grad", rg)):
                if r.err:
                    bad.append(f"{c.name} [{lo},{hi}) {kind}: cuda error {r.err}: {r.msg}")
                    ok = False
            if ok:
                parts.append(_from_payload(rp.payload, torch.float32).view(rows, k))
                w, ld = hi - lo, hi - lo + c.stride_extra
                flat = _bits(_from_payload(rg.payload, c.z.dtype))
                full = torch.cat([flat, flat.new_full((rows * ld - flat.numel(),), -1)]).view(rows, ld)
                dz.append(full[:, :w].view(c.z.dtype))
                if not bool((full[:, w:] == -1).all()):  # the driver's 0xFF fill between the rows
                    bad.append(f"{c.name} [{lo},{hi}) grad: wrote into the gap between rows of dz")
        if not ok:
            continue
        (lp, h, sc, kl), _ = merge(torch.stack(parts), c.labels, c.vocab)
        want, want_grad = reference_with_grads(c.z, c.labels, c.vocab, c.temperature, c.ref, c.up)
        x = c.z[:, :c.vocab].double() / c.temperature
        scale = torch.where(torch.isfinite(x), x.abs(), torch.zeros_like(x)).amax(1).clamp(min=1.0)
        for name, got, w in zip(["logprob", "entropy", "self_certainty", "kl"], [lp, h, sc, kl], want):
            _close(got, w, 8e-5, 8e-5 * scale, f"{c.name} {name}", bad)
        for row in c.uniform_rows:
            if float(sc[row]) != 0.0:
                bad.append(f"{c.name} uniform row {row}: self_certainty {float(sc[row])!r}, not 0")
        grad = torch.cat(dz, 1)
        grtol = 1e-4 if c.z.dtype == torch.float32 else 1e-2
        _close(grad, want_grad, grtol, 1e-6 / c.temperature, f"{c.name} grad", bad)
        if not torch.equal(grad[:, c.vocab:].double(), torch.zeros_like(want_grad[:, c.vocab:])):
            bad.append(f"{c.name} grad: padding columns are not exactly 0")
    return bad
