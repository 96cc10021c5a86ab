"""Float64 full-vocabulary reference for ``token_stats``, written from the definitions.

Shared by the unit, distributed, GPU and CUDA-emulator tests. Independent of ``dualrpo_mcore.ops``:
plain log_softmax / logsumexp / mean in float64, gradients by autograd.
unit/test_token_stats_reference.py pins the reference itself to a loop over a tiny vocabulary.
"""
import math

import torch

IGNORE = -100


def reference(z, labels, vocab_size, temperature=1.0, ref=None):
    """z: ``[T, V_padded]`` full vocabulary (any float dtype; upcast to float64)."""
    x = z[:, :vocab_size].double() / temperature
    lse = torch.logsumexp(x, dim=1)
    logp = x - lse[:, None]
    p = logp.exp()
    ignore = labels == IGNORE
    lp = logp.gather(1, labels.clamp(min=0)[:, None])[:, 0]
    lp = torch.where(ignore, torch.zeros_like(lp), lp)
    # p * x with x = -inf is 0 * -inf; those columns have p = 0 and contribute nothing.
    x_safe = torch.where(torch.isinf(x), torch.zeros_like(x), x)
    entropy = lse - (p * x_safe).sum(1)
    sc = lse - x.mean(1) - math.log(vocab_size)
    kl = None
    if ref is not None:
        lq = torch.log_softmax(ref[:, :vocab_size].double() / temperature, dim=1)
        diff = torch.where(p > 0, logp - lq, torch.zeros_like(logp))
        kl = (p * diff).sum(1)
    return lp, entropy, sc, kl


def reference_with_grads(z, labels, vocab_size, temperature, ref, upstream):
    """Outputs and d(sum_k upstream_k . out_k)/dz in float64 (z full, padding columns included)."""
    zz = z.detach().double().requires_grad_(True)
    outs = reference(zz, labels, vocab_size, temperature, None if ref is None else ref.double())
    outs = [o for o in outs if o is not None]
    (grad,) = torch.autograd.grad(outs, [zz], upstream[:len(outs)])
    return [o.detach() for o in outs], grad


def awkward_inputs(rows, vocab_size, pad, dtype, seed=0, extreme=True):
    """Logits with ±1e4 rows, -inf entries (never at the label), ignore labels, edge labels."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, vocab_size + pad, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, vocab_size, (rows,), generator=g)
    labels[0], labels[1 % rows], labels[2 % rows] = 0, vocab_size - 1, IGNORE
    if extreme and rows >= 6:
        z[3, : vocab_size // 2] = 1e4
        z[3, vocab_size // 2: vocab_size] = -1e4
        z[4, 5 % vocab_size] = 1e4
        z[5, 1::3] = float("-inf")
        labels[5] = 0
    z[:, vocab_size:] = 7.0  # padding columns hold junk that must be ignored
    ref = torch.randn(rows, vocab_size + pad, generator=g, dtype=torch.float64) * 2
    if extreme and rows >= 6:
        ref[5, 1::3] = float("-inf")  # -inf in the reference only where the policy is 0 too
    return z.to(dtype), labels, ref.to(dtype)


def tolerance(dtype, z):
    """(rtol, atol) for float32-accumulated statistics of inputs like ``z``."""
    finite = z[torch.isfinite(z)].double().abs()
    scale = max(1.0, float(finite.max())) if finite.numel() else 1.0
    return 2e-5, 2e-5 * scale
