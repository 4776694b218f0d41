"""obdk — Optimal Brain Decomposition: low-rank LLM compression and fused low-rank inference.

Public API (see README): ``factorize``, ``calibrate``, ``compress``,
``save_pretrained``, ``load_pretrained``, ``LowRankConfig``, ``LowRankLinear``.
"""
from __future__ import annotations

import logging

__version__ = "0.1.0"

logging.getLogger("obdk").addHandler(logging.NullHandler())

from . import _ext  # noqa: E402  (never raises)
from . import ops  # noqa: E402,F401  (declares the torch.library ops)

__all__ = ["__version__", "ops"]
