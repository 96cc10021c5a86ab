"""The CUDA kernel of ``token_stats`` against float64 at awkward shapes (skipped without CUDA).

Shapes: V_local not a multiple of the 16-byte vector, odd row strides (the scalar path),
padding columns, labels on shard edges, ignore labels, ±1e4 / -inf, temperature 0.7, fp32/bf16/
fp16, with and without reference logits. Vocab-parallel shards are checked on one GPU by merging
the per-shard partials with the same merge the all-gather path uses.
"""
import pytest
import torch

from dualrpo_mcore.ops import _ext
from dualrpo_mcore.ops.token_stats import merge, token_stats
from helpers.backends import cuda_kernel_marks
from helpers.close import assert_close
from helpers.token_stats_ref import awkward_inputs, reference_with_grads, tolerance

pytestmark = cuda_kernel_marks("the CUDA kernel")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab,pad,odd_stride", [(37, 5, False), (1003, 13, False), (4099, 0, True)])
@pytest.mark.parametrize("with_ref", [False, True])
def test_cuda_matches_float64(dtype, vocab, pad, odd_stride, with_ref):
    z, labels, ref = awkward_inputs(13, vocab, pad, dtype, seed=vocab)
    ref = ref if with_ref else None
    zc = z.cuda()
    if odd_stride:  # a row stride that breaks 16-byte alignment -> scalar path
        buf = torch.zeros(z.shape[0], z.shape[1] + 1, dtype=dtype, device="cuda")
        buf[:, :-1] = zc
        zc = buf[:, :-1]
    x = zc.detach().requires_grad_(True)
    out = token_stats(x, labels.cuda(), vocab_size=vocab, temperature=0.7,
                      ref_logits=None if ref is None else ref.cuda(), backend="ext")
    outs = list(out) + ([out.kl] if ref is not None else [])
    g = torch.Generator().manual_seed(1)
    up = [torch.randn(13, generator=g, dtype=torch.float64) for _ in range(4)]
    want, want_grad = reference_with_grads(z, labels, vocab, 0.7, ref, up)
    rtol, atol = tolerance(dtype, z / 0.7)
    for name, o, w in zip(["logprob", "entropy", "sc", "kl"], outs, want):
        assert_close(o, w, 4 * rtol, 4 * atol, name)  # exp2f on the GPU: a few ulp more than the CPU
    (grad,) = torch.autograd.grad(outs, [x], [u.float().cuda() for u in up[:len(outs)]])
    assert_close(grad, want_grad, 1e-4 if dtype == torch.float32 else 1e-2, 1e-6 / 0.7, "grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_shards_merge_to_full_vocab(dtype):
    z, labels, ref = awkward_inputs(9, 150, 6, dtype, seed=3)
    labels[6], labels[7] = 41, 42  # the first shard boundary, both sides
    bounds = [0, 42, 97, 156]
    partials, _ = _ext.ops("ext")
    parts = [partials(z[:, a:b].cuda(), labels.cuda(), ref[:, a:b].cuda(), a, max(0, min(b, 150) - a),
                      150, 1.0) for a, b in zip(bounds, bounds[1:])]
    (lp, h, sc, kl), _ = merge(torch.stack(parts), labels.cuda(), 150)
    want, _ = reference_with_grads(z, labels, 150, 1.0, ref, [torch.zeros(9)] * 4)
    rtol, atol = tolerance(dtype, z)
    for name, o, w in zip(["logprob", "entropy", "sc", "kl"], [lp, h, sc, kl], want):
        assert_close(o, w, 4 * rtol, 4 * atol, name)


def test_cuda_agrees_with_cpu_kernel():
    z, labels, ref = awkward_inputs(17, 3001, 7, torch.bfloat16, seed=9)
    cpu = token_stats(z, labels, vocab_size=3001, ref_logits=ref, backend="ext")
    gpu = token_stats(z.cuda(), labels.cuda(), vocab_size=3001, ref_logits=ref.cuda(), backend="ext")
    for a, b in zip(list(cpu) + [cpu.kl], list(gpu) + [gpu.kl]):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_uniform_rows_have_zero_self_certainty(dtype):
    offsets = [v for v in (1.4e4, -3e4, 1e6) if torch.isfinite(torch.tensor(v).to(dtype))]
    for vocab in (1, 1001, 50000):
        z = torch.tensor(offsets).to(dtype)[:, None].expand(-1, vocab).contiguous().cuda()
        labels = torch.zeros(len(offsets), dtype=torch.long, device="cuda")
        sc = token_stats(z, labels, temperature=0.7, backend="ext").self_certainty
        assert torch.equal(sc, torch.zeros_like(sc)), (vocab, sc.tolist())


def test_cuda_glue_checks_its_arguments():
    partials, grad = _ext.ops("ext")
    z = torch.randn(4, 40, device="cuda")
    y = torch.zeros(4, dtype=torch.long, device="cuda")
    with pytest.raises(RuntimeError, match="n_real = 41 outside"):
        partials(z, y, None, 0, 41, 40, 1.0)
    with pytest.raises(RuntimeError, match="labels must be"):
        partials(z, y[:3], None, 0, 40, 40, 1.0)
    with pytest.raises(RuntimeError, match="labels are on cpu"):
        partials(z, y.cpu(), None, 0, 40, 40, 1.0)
    with pytest.raises(RuntimeError, match="grads must be"):
        grad(z, y, None, torch.zeros(4, 3, device="cuda"), torch.zeros(4, 3, device="cuda"), 0, 40, 40, 1.0)
