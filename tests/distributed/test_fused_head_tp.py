"""``fused_head`` vocab-parallel over TP = 1, 2, 3 gloo processes against the float64 reference.

Each rank holds an uneven row shard of the padded output weight (at TP = 3 the last shard is partly
padding), the same hidden states, labels (some on shard boundaries, some ignored), mask and
temperature; several chunks per call; and a call whose mask selects no row (a filler micro-batch). Checks: outputs against float64 (the full KL included), ranks
bitwise identical, d hidden (summed over the group inside the op) against float64 on every rank, the
ranks' d weight shards concatenated against the full float64 gradient, and the collectives: one
all-gather in forward, one all-reduce (of d hidden) in backward, none at TP = 1.
"""
import pytest
import torch
import torch.distributed as dist

from dualrpo_mcore.ops import load_extension
from dualrpo_mcore.parallel.spawn import run_distributed
from helpers.close import assert_close
from helpers.collectives import count_collectives

VOCAB, PAD, ROWS, HID, TEMP = 37, 5, 19, 12, 0.7
BOUNDS = {1: [0, 42], 2: [0, 20, 42], 3: [0, 15, 30, 42]}  # over the 42 padded weight rows
DTYPES = [torch.float32, torch.bfloat16]
CHUNK_BYTES = 4 * 42 * 4 * 4  # a few rows per chunk: several chunks per call
BACKENDS = ["torch"] + (["ext"] if load_extension() is not None else [])




def _rank_fn(rank, world_size, cases):
    """One spawn of 3 processes serves TP = 1, 2, 3 through subgroups."""
    from dualrpo_mcore.ops import fused_head

    calls = []
    count_collectives(calls)
    results = {}
    for tp in sorted(BOUNDS):
        group = dist.new_group(list(range(tp)))  # every rank of the world calls new_group
        if rank >= tp:
            continue
        lo, hi = BOUNDS[tp][rank], BOUNDS[tp][rank + 1]
        results[tp] = []
        for case in cases:
            h = case["h"].clone().requires_grad_(True)
            w = case["w"][lo:hi].clone().requires_grad_(True)
            ref = case["ref"]
            rh, rw = (None, None) if ref is None else (ref[0], ref[1][lo:hi].contiguous())
            del calls[:]
            out = fused_head(h, w, case["labels"], mask=case["mask"], temperature=TEMP, vocab_start=lo,
                             vocab_size=VOCAB, group=group, ref_hidden=rh, ref_weight=rw,
                             chunk_bytes=CHUNK_BYTES, backend=case["backend"])
            fwd_calls = list(calls)
            outs = list(out) + ([out.kl] if ref is not None else [])
            del calls[:]
            dh, dw = torch.autograd.grad(outs, [h, w], [u.float() for u in case["up"][:len(outs)]])
            results[tp].append({"outs": [o.detach() for o in outs], "dh": dh, "dw": dw,
                                "fwd_calls": fwd_calls, "bwd_calls": list(calls)})
            if ref is None:
                results[tp][-1]["loss_path"] = _loss_path(case, group, lo, hi, calls)
    dist.barrier()
    return results


def _loss_path(case, group, lo, hi, calls):
    """``fused_head_loss`` with the linear loss sum_k up_k . out_k: the same gradients as above."""
    from dualrpo_mcore.ops import fused_head_loss

    h = case["h"].clone().requires_grad_(True)
    w = case["w"][lo:hi].clone().requires_grad_(True)
    up = [u.float() for u in case["up"][:3]]
    del calls[:]
    loss, stats, _ = fused_head_loss(h, w, case["labels"], lambda ts: (sum((u * t).sum() for u, t in zip(up, ts[:3])), None),
                                     mask=case["mask"], temperature=TEMP, vocab_start=lo, vocab_size=VOCAB,
                                     group=group, chunk_bytes=CHUNK_BYTES, backend=case["backend"])
    fwd_calls = list(calls)
    del calls[:]
    dh, dw = torch.autograd.grad(loss, [h, w])
    return {"outs": list(stats[:3]), "dh": dh, "dw": dw, "fwd_calls": fwd_calls, "bwd_calls": list(calls)}


def _cases():
    cases = []
    for i, dtype in enumerate(DTYPES):
        g = torch.Generator().manual_seed(30 + i)
        h = torch.randn(ROWS, HID, generator=g, dtype=torch.float64)
        h[2] *= 30.0
        w = torch.randn(VOCAB + PAD, HID, generator=g, dtype=torch.float64) * 0.6
        labels = torch.randint(0, VOCAB, (ROWS,), generator=g)
        labels[0], labels[1], labels[2], labels[3], labels[4] = 14, 15, 29, 30, 36  # shard edges, last id
        labels[5] = -100
        mask = torch.ones(ROWS, dtype=torch.bool)
        mask[6:9] = False
        rh = torch.randn(ROWS, HID + 2, generator=g, dtype=torch.float64)
        rw = torch.randn(VOCAB + PAD, HID + 2, generator=g, dtype=torch.float64) * 0.5
        up = [torch.randn(ROWS, generator=g, dtype=torch.float64) for _ in range(4)]
        for backend in BACKENDS:
            for with_ref in (False, True):
                cases.append({"h": h.to(dtype), "w": w.to(dtype), "labels": labels, "mask": mask, "up": up,
                              "ref": (rh.to(dtype), rw.to(dtype)) if with_ref else None, "backend": backend})
    # A filler micro-batch: no row selected. Zero rows still go through both collectives on every rank.
    empty = dict(cases[0], mask=torch.zeros(ROWS, dtype=torch.bool))
    return cases + [empty]


def _reference(case):
    from helpers.token_stats_ref import reference

    hh = case["h"].double().requires_grad_(True)
    ww = case["w"].double().requires_grad_(True)
    ref = None if case["ref"] is None else case["ref"][0].double() @ case["ref"][1].double().t()
    outs = [o for o in reference(hh @ ww.t(), case["labels"], VOCAB, TEMP, ref) if o is not None]
    outs = [torch.where(case["mask"], o, torch.zeros_like(o)) for o in outs]
    dh, dw = torch.autograd.grad(outs, [hh, ww], case["up"][:len(outs)])
    scale = ((hh @ ww.t()).detach().abs().amax(1) / TEMP).clamp(min=1.0)
    return [o.detach() for o in outs], dh, dw, scale


@pytest.fixture(scope="module")
def tp_results():
    cases = _cases()
    return cases, run_distributed(_rank_fn, max(BOUNDS), cases, timeout=240)


@pytest.mark.parametrize("tp", [1, 2, 3])
def test_vocab_parallel_fused_head_matches_float64(tp, tp_results):
    cases, by_rank = tp_results
    per_rank = [by_rank[r][tp] for r in range(tp)]
    for ci, case in enumerate(cases):
        dtype = case["h"].dtype
        what = f"TP={tp} {dtype} {case['backend']} ref={case['ref'] is not None}"
        first = per_rank[0][ci]
        for r in range(1, tp):  # every rank returns bitwise the same statistics and d hidden
            for a, b in zip(first["outs"] + [first["dh"]], per_rank[r][ci]["outs"] + [per_rank[r][ci]["dh"]]):
                assert torch.equal(a, b), what
        for r in range(tp):
            want_fwd, want_bwd = (["all_gather"], ["all_reduce"]) if tp > 1 else ([], [])
            assert per_rank[r][ci]["fwd_calls"] == want_fwd, (what, per_rank[r][ci]["fwd_calls"])
            assert per_rank[r][ci]["bwd_calls"] == want_bwd, (what, per_rank[r][ci]["bwd_calls"])
        want, want_dh, want_dw, scale = _reference(case)
        eps = 2e-5 if dtype == torch.float32 else 2 ** -6
        for name, got, w in zip(["logprob", "entropy", "self_certainty", "kl"], first["outs"], want):
            assert_close(got, w, eps, eps * scale, f"{what} {name}")
        geps = 2e-4 if dtype == torch.float32 else 2 ** -5
        assert_close(first["dh"], want_dh, geps, geps * float(want_dh.abs().max()), f"{what} d hidden")
        dw = torch.cat([per_rank[r][ci]["dw"] for r in range(tp)])
        assert dw.shape == case["w"].shape and dw.dtype == dtype
        assert_close(dw, want_dw, geps, geps * float(want_dw.abs().max()), f"{what} d weight")
        assert torch.equal(dw[VOCAB:], torch.zeros_like(dw[VOCAB:])), f"{what}: padding rows got a gradient"


@pytest.mark.parametrize("tp", [1, 2, 3])
def test_vocab_parallel_fused_head_loss_matches_float64(tp, tp_results):
    """The loss path: one all-gather per chunk (the same chunks on every rank, uneven shards
    included), one all-reduce in backward; statistics and gradients against float64."""
    cases, by_rank = tp_results
    per_rank = [by_rank[r][tp] for r in range(tp)]
    checked = 0
    for ci, case in enumerate(cases):
        if case["ref"] is not None:
            continue
        dtype, checked = case["h"].dtype, checked + 1
        what = f"loss path TP={tp} {dtype} {case['backend']}"
        got = [per_rank[r][ci]["loss_path"] for r in range(tp)]
        for r in range(1, tp):
            for a, b in zip(got[0]["outs"] + [got[0]["dh"]], got[r]["outs"] + [got[r]["dh"]]):
                assert torch.equal(a, b), what
        chunks = -(-int(case["mask"].sum()) // max(1, CHUNK_BYTES // (-(-VOCAB // tp) * dtype.itemsize * (2 + (dtype != torch.float32)))))
        for r in range(tp):
            assert got[r]["fwd_calls"] == (["all_gather"] * chunks if tp > 1 else []), (what, got[r]["fwd_calls"])
            assert got[r]["bwd_calls"] == (["all_reduce"] if tp > 1 else []), (what, got[r]["bwd_calls"])
        want, want_dh, want_dw, scale = _reference(case)
        eps = 2e-5 if dtype == torch.float32 else 2 ** -6
        for name, g, w in zip(["logprob", "entropy", "self_certainty"], got[0]["outs"], want):
            assert_close(g, w, eps, eps * scale, f"{what} {name}")
        geps = 2e-4 if dtype == torch.float32 else 2 ** -5
        assert_close(got[0]["dh"], want_dh, geps, geps * float(want_dh.abs().max()), f"{what} d hidden")
        dw = torch.cat([got[r]["dw"] for r in range(tp)])
        assert dw.shape == case["w"].shape and dw.dtype == dtype
        assert_close(dw, want_dw, geps, geps * float(want_dw.abs().max()), f"{what} d weight")
    assert checked
