"""The float64 ``token_stats`` reference (tests/helpers/token_stats_ref.py) pinned to a direct loop
over a tiny vocabulary, so the unit, distributed and GPU tests compare against the definitions."""
import math

import torch

from helpers.token_stats_ref import reference


def test_reference_matches_loop():
    z = torch.tensor([[0.3, -1.2, 2.0, 0.5, 9.0]], dtype=torch.float64)
    r = torch.tensor([[1.0, 0.0, -0.5, 0.25, 3.0]], dtype=torch.float64)
    V, T = 4, 0.8
    xs = [v / T for v in z[0, :V].tolist()]
    rs = [v / T for v in r[0, :V].tolist()]
    Z = sum(math.exp(v) for v in xs)
    Zr = sum(math.exp(v) for v in rs)
    p = [math.exp(v) / Z for v in xs]
    q = [math.exp(v) / Zr for v in rs]
    lp, h, sc, kl = reference(z, torch.tensor([2]), V, T, r)
    assert math.isclose(float(lp), math.log(p[2]), rel_tol=1e-12)
    assert math.isclose(float(h), -sum(pi * math.log(pi) for pi in p), rel_tol=1e-12)
    assert math.isclose(float(sc), sum(-math.log(V * pi) for pi in p) / V, rel_tol=1e-12)
    assert math.isclose(float(kl), sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)), rel_tol=1e-12)
