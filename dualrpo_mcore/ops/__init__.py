"""Python face of ``csrc/``: fused vocab-parallel token statistics (see ``token_stats.py``).

``token_stats`` runs the compiled kernel (C++ on CPU, CUDA on GPU) when ``dualrpo_mcore._C`` is
built, else a pure-torch fallback with the same semantics (logged once). ``fused_head`` and
``fused_head_loss``: the output layer fused with the statistics (docs/fused_head.md).
"""
from ._ext import BACKEND_ENV, load_error, load_extension
from .fused_head import fused_head
from .fused_head_loss import fused_head_loss
from .token_stats import IGNORE_INDEX, TokenStats, token_stats

__all__ = ["token_stats", "fused_head", "fused_head_loss", "TokenStats", "IGNORE_INDEX", "BACKEND_ENV", "load_extension", "load_error"]
