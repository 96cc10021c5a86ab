"""Inputs and the float64 reference of the fused output head (``hidden @ weight.T`` then the token
statistics of ``helpers.token_stats_ref``), shared by the fused-head and fused-head-loss tests."""
import torch

from helpers.token_stats_ref import IGNORE, reference

T, H, VOCAB, PAD, TEMP = 29, 24, 53, 7, 0.7


def make_inputs(dtype, seed=0, rows=T, hidden=H, vocab=VOCAB, pad=PAD):
    """Hidden states, a padded weight [vocab + pad, H], labels with ignores and edge ids, a mask."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=g, dtype=torch.float64)
    w = torch.randn(vocab + pad, hidden, generator=g, dtype=torch.float64) * (2.0 / hidden ** 0.5)
    h[1] = 0.0            # uniform row: entropy log V, self-certainty 0
    h[2] *= 40.0          # logits of size ~100: the max shift matters
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[0], labels[3], labels[4] = 0, vocab - 1, IGNORE
    mask = torch.ones(rows, dtype=torch.bool)
    mask[5:9] = False     # a run of rows the op must skip (prompt tokens)
    mask[-1] = False
    return h.to(dtype), w.to(dtype), labels, mask


def reference_head(h, w, labels, vocab_size, temperature, mask=None, rh=None, rw=None, upstream=None):
    """float64 outputs and (d hidden, d weight[, ...]) of sum_k upstream_k . out_k."""
    hh = h.detach().double().requires_grad_(True)
    ww = w.detach().double().requires_grad_(True)
    ref = None if rh is None else rh.double() @ rw.double().t()
    outs = [o for o in reference(hh @ ww.t(), labels, vocab_size, temperature, ref) if o is not None]
    if mask is not None:
        outs = [torch.where(mask, o, torch.zeros_like(o)) for o in outs]
    if upstream is None:
        return [o.detach() for o in outs], None
    dh, dw = torch.autograd.grad(outs, [hh, ww], upstream[:len(outs)])
    return [o.detach() for o in outs], (dh, dw)
