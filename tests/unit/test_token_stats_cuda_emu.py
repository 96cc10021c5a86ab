"""The real CUDA kernel (csrc/token_stats_cuda.cu) on the CPU, through the emulator in csrc/emu/.

g++ builds the unchanged .cu against csrc/emu/cuda_emu.h (fibers for the threads of a block, real
__syncthreads / warp-shuffle semantics with the masks checked). The cases cover TP = 1 and vocab
shards merged by the production merge, padding columns, ignore labels, V = 1 and odd V, rows on
the 16-byte vector path and on the scalar path (odd stride, misaligned pointer), bf16/fp16/fp32,
temperature != 1, and uniform rows at large offsets; forward and backward against float64.
Hand-made mutants of the kernel must each be caught. One build runs under ASan + UBSan.
Everything is compiled once per module, two g++ at a time.
"""
from __future__ import annotations

import sys
import time

import pytest
import torch

import helpers.token_stats_emu as E
from helpers.token_stats_ref import IGNORE, awkward_inputs

pytestmark = pytest.mark.skipif(E.GXX is None, reason="g++ not on PATH: cannot build the CUDA emulator")
NAN = float("nan")


def _up(rows, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, generator=g, dtype=torch.float64) for _ in range(4)]


def _case(name, rows, vocab, pad, dtype, temperature, with_ref, bounds=None, seed=0, extreme=True, **kw):
    z, labels, ref = awkward_inputs(rows, vocab, pad, dtype, seed=seed, extreme=extreme)
    z[:, vocab:] = NAN  # padding is never read for a statistic: nan there would show
    bounds = bounds or [0, vocab + pad]
    return E.Case(name, z, labels, ref if with_ref else None, vocab, temperature, bounds, up=_up(rows, seed), **kw)


def _uniform_case(name, dtype, offsets, vocab, bounds=None, temperature=0.7):
    rows = len(offsets) + 2
    g = torch.Generator().manual_seed(vocab)
    z = (torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 3).to(dtype)
    for i, v in enumerate(offsets):
        z[i] = v
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[-1] = IGNORE
    ref = (torch.randn(rows, vocab, generator=g, dtype=torch.float64)).to(dtype)
    return E.Case(name, z, labels, ref, vocab, temperature, bounds or [0, vocab],
                  uniform_rows=range(len(offsets)), up=_up(rows, vocab))


def cases():
    c = [
        # 16-byte rows (stride 44 / 1008) whose widths leave a tail after the last full vector
        _case("fp32 V=37 pad 5 vector+tail ref T=0.7", 8, 37, 5, torch.float32, 0.7, True, stride_extra=2),
        _case("bf16 V=1001 pad 3 vector+tail T=1", 7, 1001, 3, torch.bfloat16, 1.0, False, seed=1,
              stride_extra=4),
        _case("fp16 V=1001 odd stride (scalar) ref T=1.3", 7, 1001, 0, torch.float16, 1.3, True, seed=2,
              stride_extra=1),
        _case("fp32 V=1 pad 3 ref", 5, 1, 3, torch.float32, 0.9, True, seed=3, extreme=False),
        _case("bf16 TP=3 shards ref T=0.9", 9, 150, 6, torch.bfloat16, 0.9, True, bounds=[0, 48, 104, 156],
              seed=4),
        _case("fp32 TP=4 one padding-only shard ref T=0.7", 10, 37, 4, torch.float32, 0.7, True,
              bounds=[0, 12, 24, 37, 41], seed=5),
        _case("fp32 V=64 misaligned pointer (scalar) ref", 4, 64, 0, torch.float32, 1.0, True, seed=6,
              extreme=False, offset=1),
        _uniform_case("fp32 uniform rows", torch.float32, [1.4e4, -3e4, 1e6], 1000),
        _uniform_case("bf16 uniform rows TP=2", torch.bfloat16, [1.4e4, -3e4, 1e6], 1001, bounds=[0, 504, 1001]),
        _uniform_case("fp16 uniform rows", torch.float16, [1.4e4, -3e4], 1001, temperature=1.0),
    ]
    sharded = c[4]
    sharded.labels[6], sharded.labels[7], sharded.labels[8] = 47, 48, 104  # on shard edges
    return c


# (name, text in the .cu, replacement, which occurrence): each must change the kernel's behaviour.
MUTANTS = [
    ("max of a vector dropped", "for (int k = 0; k < n; ++k) vmax = fmaxf(vmax, x[k]);", "vmax = x[0];", 0),
    ("max dropped in the merge", "o.m = fmaxf(p.m, q.m);", "o.m = p.m;", 0),
    ("vector tail off by one (forward)", "tail = nvec * VEC;", "tail = nvec * VEC + 1;", 0),
    ("vector tail off by one (backward)", "tail = nvec * VEC;", "tail = nvec * VEC + 1;", 1),
    ("scalar tail reads n_real", "j < n_real; j += kThreads) {  // tail", "j <= n_real; j += kThreads) {  //", 0),
    ("vector count rounded up", "const int64_t nvec = n_real / VEC;", "const int64_t nvec = (n_real + VEC - 1) / VEC;", 0),
    ("shuffle mask leaves out lane 31", "o.b = __shfl_xor_sync(0xffffffffu", "o.b = __shfl_xor_sync(0x7fffffffu", 0),
    ("warp tree starts at 8", "for (int lane = 16; lane > 0;", "for (int lane = 8; lane > 0;", 0),
    ("no barrier before warp 0 reads", "  __syncthreads();\n  if (threadIdx.x < 32)", "  if (threadIdx.x < 32)", 0),
    ("no barrier before the next row", "  __syncthreads();  // warp_acc", "  // warp_acc", 0),
    ("no grid-stride loop (forward)", "row += gridDim.x", "row += rows", 0),
    ("no grid-stride loop (backward)", "row += gridDim.x", "row += rows", 1),
    ("B not re-based in the merge", "o.b += t.m > -CUDART_INF_F ? t.b + t.n * (t.m - o.m) : t.b;", "o.b += t.b;", 0),
    ("B not re-based when the max rises", "if (acc.m > -CUDART_INF_F) acc.b += acc.n * (acc.m - vmax);", "", 0),
    ("label column off by one", "if (j == label) g += gr[0];", "if (j == label + 1) g += gr[0];", 0),
    ("label owned one past the shard", "local >= 0 && local < n_real) ylogit", "local >= 0 && local <= n_real) ylogit", 0),
    ("pair stored swapped", "from_f2(g[k], g[k + 1], out.e + k)", "from_f2(g[k + 1], g[k], out.e + k)", 0),
    ("alignment test of the pointer weakened", "reinterpret_cast<uintptr_t>(p) % 16 == 0", "reinterpret_cast<uintptr_t>(p) % 4 == 0", 0),
    ("temperature not applied to a pack", "x[k] = __fmul_rn(to_f(p.e[k]), inv_t);", "x[k] = to_f(p.e[k]);", 0),
    ("reference shifted by the policy max", "const float dr = xr[k] - shift_r;", "const float dr = xr[k] - shift;", 0),
]


def _mutate(src: str, old: str, new: str, which: int) -> str:
    at = -1
    for _ in range(which + 1):
        at = src.index(old, at + 1)  # ValueError: the kernel changed and the mutant is stale
    return src[:at] + new + src[at + len(old):]


def _build(tmp):
    """Engine and driver once per flag set, the kernel once per variant, then links; 2 at a time."""
    src = E.KERNEL.read_text()
    normal, asan = ["-O2", *E.CHECKS], E.ASAN
    compiles = [("engine", E.compile_cmd(tmp / "engine.o", E.EMU / "cuda_emu.cpp", normal)),
                ("driver", E.compile_cmd(tmp / "driver.o", E.EMU / "token_stats_emu.cpp", normal)),
                ("main", E.compile_cmd(tmp / "main.o", E.KERNEL, ["-O2", "-Werror", *E.SMALL_GRID, *E.CHECKS])),
                ("engine_asan", E.compile_cmd(tmp / "engine_asan.o", E.EMU / "cuda_emu.cpp", asan)),
                ("driver_asan", E.compile_cmd(tmp / "driver_asan.o", E.EMU / "token_stats_emu.cpp", asan)),
                # the default grid cap: the dry runs check the real launch configuration
                ("asan", E.compile_cmd(tmp / "asan.o", E.KERNEL, asan))]
    for i, (_, old, new, which) in enumerate(MUTANTS):
        path = tmp / f"mutant{i}.cu"
        path.write_text(_mutate(src, old, new, which))
        compiles.append((f"mutant{i}", E.compile_cmd(tmp / f"mutant{i}.o", path, ["-O0", *E.SMALL_GRID, *E.CHECKS])))
    built = E.build_all(compiles)
    for name in ("engine", "driver", "main", "engine_asan", "driver_asan", "asan"):
        assert built[name][0] == 0, f"g++ failed on {name}:\n{built[name][1][-4000:]}"
    links = [("link_main", E.link_cmd(tmp / "main", [tmp / "engine.o", tmp / "driver.o", tmp / "main.o"], E.CHECKS)),
             ("link_asan", E.link_cmd(tmp / "asan", [tmp / "engine_asan.o", tmp / "driver_asan.o", tmp / "asan.o"],
                                      E.ASAN))]
    for i in range(len(MUTANTS)):
        if built[f"mutant{i}"][0] == 0:
            links.append((f"link_mutant{i}", E.link_cmd(tmp / f"mutant{i}",
                                                        [tmp / "engine.o", tmp / "driver.o", tmp / f"mutant{i}.o"],
                                                        E.CHECKS)))
    built.update(E.build_all(links))
    for name in ("link_main", "link_asan"):
        assert built[name][0] == 0, f"link failed ({name}):\n{built[name][1][-4000:]}"
    return built


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cuda_emu")
    t0 = time.monotonic()
    built = _build(tmp)
    cs = cases()
    return {"tmp": tmp, "built": built, "cases": cs, "blob": {o: E.encode(cs, o, seed=7) for o in (0, 1, 2)},
            "t0": t0}


@pytest.mark.parametrize("order", [E.FORWARD, E.REVERSE, E.RANDOM], ids=["forward", "reverse", "random"])
def test_kernel_matches_float64(emu, order):
    rc, err, results = E.run(emu["tmp"] / "main", emu["blob"][order], emu["tmp"])
    assert rc == 0, err[-4000:]
    bad = E.check(emu["cases"], results)
    assert not bad, "\n".join(bad[:20])
    # The block tree is fixed: the scheduling order of the threads must not change a single bit.
    if order != E.FORWARD:
        _, _, first = E.run(emu["tmp"] / "main", emu["blob"][E.FORWARD], emu["tmp"])
        assert [r.payload for r in results] == [r.payload for r in first]


def test_grid_stride_was_exercised(emu):
    _, _, results = E.run(emu["tmp"] / "main", emu["blob"][E.FORWARD], emu["tmp"])
    grids = {g for r in results for g, _ in r.launches}
    assert grids <= {1, 2, 3} and 3 in grids  # rows > blocks: blocks walk several rows
    assert {b for r in results for _, b in r.launches} == {256}


@pytest.mark.parametrize("grad", [False, True], ids=["partials", "grad"])
def test_more_than_2_31_rows_launch(emu, grad):
    rows = 2**31 + 5
    blob = E.case_file([E.dry_run_record(grad, rows, 1000)])
    rc, err, results = E.run(emu["tmp"] / "asan", blob, emu["tmp"])
    assert rc == 0, err[-4000:]
    (res,) = results
    assert res.err == 0, f"launch of {rows} rows failed: {res.msg}"
    (grid, block), = res.launches
    assert 1 <= grid <= 2**31 - 1 and block == 256


def test_bf16_fp16_conversions_round_like_torch(emu):
    g = torch.Generator().manual_seed(0)
    vals = torch.cat([torch.randn(2000, generator=g) * 10.0 ** torch.randint(-8, 6, (2000,), generator=g),
                      torch.tensor([0.0, -0.0, 65504.0, 65519.0, 65520.0, 1e-8, 2.0**-25, 2.0**-24, 3e-5, 1e39,
                                    float("inf"), -float("inf"), 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8])])
    vals = torch.cat([vals, (vals.to(torch.bfloat16).float() + vals) / 2])  # ties
    blob = E.case_file([E.conversion_record(vals)])
    rc, err, (res,) = E.run(emu["tmp"] / "main", blob, emu["tmp"])
    assert rc == 0, err
    n = vals.numel()
    bits = torch.frombuffer(bytearray(res.payload[:4 * n]), dtype=torch.int16)
    back = torch.frombuffer(bytearray(res.payload[4 * n:]), dtype=torch.float32)
    assert torch.equal(bits[:n], vals.to(torch.bfloat16).view(torch.int16))
    assert torch.equal(bits[n:], vals.to(torch.float16).view(torch.int16))
    assert torch.equal(back[:n], vals.to(torch.bfloat16).float())
    assert torch.equal(back[n:], vals.to(torch.float16).float())


def test_one_case_under_asan_and_ubsan(emu):
    one = [c for c in emu["cases"] if c.name.startswith("bf16 TP=3")]
    rc, err, results = E.run(emu["tmp"] / "asan", E.encode(one, E.REVERSE), emu["tmp"], timeout=300)
    assert rc == 0, f"sanitizer run failed:\n{err[-6000:]}"
    assert not E.check(one, results)


def test_every_mutant_is_caught(emu):
    caught, missed = [], []
    for i, (name, *_rest) in enumerate(MUTANTS):
        rc_b, err_b = emu["built"][f"mutant{i}"]
        if rc_b == 0:
            rc_b, err_b = emu["built"][f"link_mutant{i}"]
        assert rc_b == 0, f"mutant {name!r} does not compile:\n{err_b[-3000:]}"
        why = None
        for order in (E.FORWARD, E.REVERSE):
            rc, err, results = E.run(emu["tmp"] / f"mutant{i}", emu["blob"][order], emu["tmp"])
            if rc != 0:
                lines = err.strip().splitlines() or [""]
                said = next((ln for ln in lines if "runtime error" in ln or "ERROR" in ln), lines[-1])
                why = f"driver died (rc {rc}): {said.strip()}"
            else:
                bad = E.check(emu["cases"], results)
                why = bad[0] if bad else None
            if why:
                break
        (caught if why else missed).append((name, why))
    report = "\n".join(f"  caught {n}: {w[:160]}" for n, w in caught)
    print(f"\n{len(caught)}/{len(MUTANTS)} kernel mutants caught "
          f"(emulation tests {time.monotonic() - emu['t0']:.1f} s so far):\n{report}", file=sys.stderr)
    assert not missed, f"mutants not caught: {[n for n, _ in missed]}"
