"""Tolerance check of computed statistics against a float64 reference."""
from __future__ import annotations

import torch


def mismatches(got: torch.Tensor, want: torch.Tensor, rtol, atol) -> torch.Tensor:
    """Bool mask of the entries outside ``atol + rtol * |want|`` (``atol`` may be a per-row tensor).

    An infinity matches only the same infinity (inf - inf would be nan), and it adds nothing to the
    bound; a nan anywhere is a mismatch, so a kernel that produces nan cannot pass.
    """
    got = got.double().cpu()
    same_inf = torch.isinf(want) & (got == want)
    diff = torch.where(same_inf, torch.zeros_like(want), (got - want).abs())
    bound = atol + rtol * torch.where(torch.isinf(want), torch.zeros_like(want), want.abs())
    return ~(diff <= bound)


def assert_close(got: torch.Tensor, want: torch.Tensor, rtol, atol, what: str) -> None:
    bad = mismatches(got, want, rtol, atol)
    if bool(bad.any()):
        diff = (got.double().cpu() - want).abs()
        raise AssertionError(f"{what}: max err {float(diff[bad].max())} at rows "
                             f"{torch.nonzero(bad)[:, 0].tolist()[:8]}")
