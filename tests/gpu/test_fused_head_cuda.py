"""``fused_head`` on CUDA (cuBLAS chunk GEMMs + the CUDA statistics kernel) against float64.

Skipped without a GPU or without the CUDA build of the extension. Checks the outputs and both
gradients at awkward shapes (padding rows, ignore labels, a mask, temperature, several chunks, the
reference KL) in fp32 and bf16, and that the logits are never stored: the peak memory of forward +
backward stays far below one [T, V] logits tensor.
"""
import pytest
import torch

from dualrpo_mcore.ops import fused_head
from helpers.backends import cuda_kernel_marks
from helpers.close import assert_close
from helpers.token_stats_ref import IGNORE, reference

pytestmark = cuda_kernel_marks("the cuBLAS + CUDA kernel path")
TEMP = 0.7


def _inputs(rows, hidden, vocab, pad, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=g, dtype=torch.float64)
    w = torch.randn(vocab + pad, hidden, generator=g, dtype=torch.float64) * (2.0 / hidden ** 0.5)
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[0], labels[1], labels[2] = 0, vocab - 1, IGNORE
    mask = torch.ones(rows, dtype=torch.bool)
    mask[3:6] = False
    return h, w, labels, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_ref", [False, True])
def test_cuda_fused_head_matches_float64(dtype, with_ref):
    rows, hidden, vocab, pad = 67, 40, 1003, 13
    h, w, labels, mask = _inputs(rows, hidden, vocab, pad, seed=1)
    rh, rw = (None, None)
    if with_ref:
        rh, rw, _, _ = _inputs(rows, hidden + 8, vocab, pad, seed=2)
    dev = dict(device="cuda", dtype=dtype)
    hc, wc = h.to(**dev).requires_grad_(True), w.to(**dev).requires_grad_(True)
    out = fused_head(hc, wc, labels.cuda(), mask=mask.cuda(), temperature=TEMP, vocab_size=vocab,
                     ref_hidden=None if rh is None else rh.to(**dev), ref_weight=None if rw is None else rw.to(**dev),
                     chunk_bytes=16 * (vocab + pad) * 4 * 4, backend="ext")  # ~16 rows per chunk: 5 chunks
    outs = list(out) + ([out.kl] if with_ref else [])
    g = torch.Generator().manual_seed(3)
    up = [torch.randn(rows, generator=g, dtype=torch.float64) for _ in outs]
    # The reference sees the inputs as the GPU got them (rounded to dtype), in float64.
    hh = h.to(dtype).double().requires_grad_(True)
    ww = w.to(dtype).double().requires_grad_(True)
    zr = None if rh is None else rh.to(dtype).double() @ rw.to(dtype).double().t()
    want = [o for o in reference(hh @ ww.t(), labels, vocab, TEMP, zr) if o is not None]
    want = [torch.where(mask, o, torch.zeros_like(o)) for o in want]
    want_dh, want_dw = torch.autograd.grad(want, [hh, ww], up)
    scale = ((hh @ ww.t()).detach().abs().amax(1) / TEMP).clamp(min=1.0)
    eps = 1e-4 if dtype == torch.float32 else 2 ** -6  # TF32 is off for fp32 matmuls by default
    for name, o, ref in zip(["logprob", "entropy", "sc", "kl"], outs, want):
        assert_close(o.cpu(), ref.detach(), eps, eps * scale, name)
    dh, dw = torch.autograd.grad(outs, [hc, wc], [u.float().cuda() for u in up])
    geps = 1e-3 if dtype == torch.float32 else 2 ** -5
    assert_close(dh.cpu(), want_dh, geps, geps * float(want_dh.abs().max()), "d hidden")
    assert_close(dw.cpu(), want_dw, geps, geps * float(want_dw.abs().max()), "d weight")
    assert torch.equal(dw[vocab:].cpu(), torch.zeros_like(dw[vocab:].cpu()))


def test_cuda_fused_head_never_holds_the_logits():
    rows, hidden, vocab = 8192, 1024, 151936
    torch.manual_seed(0)
    h = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(vocab, hidden, device="cuda") / hidden ** 0.5).to(torch.bfloat16).requires_grad_(True)
    y = torch.randint(0, vocab, (rows,), device="cuda")
    budget = 128 * 2**20
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fused_head(h, w, y, chunk_bytes=budget, backend="ext")
    torch.autograd.backward(list(out), [torch.ones_like(o) for o in out])
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    logits = rows * vocab * 2
    grads = (h.numel() + w.numel()) * 2
    fp32_dw = w.numel() * 4  # several chunks in bf16: dW is summed in fp32
    # Everything beyond the gradients, the fp32 dW buffer and one chunk budget is small change.
    assert peak < grads + fp32_dw + budget + 64 * 2**20, (peak, logits)
    assert peak < logits / 2, (peak, logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_fused_head_loss_matches_float64(dtype):
    """The loss path (gradients formed in the forward) on cuBLAS + the CUDA kernel."""
    from dualrpo_mcore.ops import fused_head_loss

    rows, hidden, vocab, pad = 67, 40, 1003, 13
    h, w, labels, mask = _inputs(rows, hidden, vocab, pad, seed=4)
    g = torch.Generator().manual_seed(6)
    up = [torch.randn(rows, generator=g, dtype=torch.float64) for _ in range(3)]
    dev = dict(device="cuda", dtype=dtype)
    hc, wc = h.to(**dev).requires_grad_(True), w.to(**dev).requires_grad_(True)
    upc = [u.float().cuda() for u in up]
    loss, stats, _ = fused_head_loss(hc, wc, labels.cuda(), lambda ts: (sum((u * t).sum() for u, t in zip(upc, ts[:3])), None),
                                     mask=mask.cuda(), temperature=TEMP, vocab_size=vocab,
                                     chunk_bytes=16 * (vocab + pad) * 4 * 3, backend="ext")
    dh, dw = torch.autograd.grad(loss, [hc, wc])
    hh = h.to(dtype).double().requires_grad_(True)
    ww = w.to(dtype).double().requires_grad_(True)
    want = [torch.where(mask, o, torch.zeros_like(o)) for o in reference(hh @ ww.t(), labels, vocab, TEMP)[:3]]
    want_dh, want_dw = torch.autograd.grad(want, [hh, ww], up)
    scale = ((hh @ ww.t()).detach().abs().amax(1) / TEMP).clamp(min=1.0)
    eps = 1e-4 if dtype == torch.float32 else 2 ** -6
    for name, o, ref in zip(["logprob", "entropy", "sc"], stats, want):
        assert_close(o.cpu(), ref.detach(), eps, eps * scale, name)
    geps = 1e-3 if dtype == torch.float32 else 2 ** -5
    assert_close(dh.cpu(), want_dh, geps, geps * float(want_dh.abs().max()), "d hidden")
    assert_close(dw.cpu(), want_dw, geps, geps * float(want_dw.abs().max()), "d weight")
