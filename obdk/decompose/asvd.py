"""ASVD: activation-aware SVD, a plain SVD of the weight scaled per input channel."""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import NonFiniteError
from .closed_form import Spectrum, spectrum
from .roots import all_finite

__all__ = ["asvd_spectrum"]


def asvd_spectrum(w: Tensor, cx: Tensor, *, alpha: float = 0.5, compute_dtype: torch.dtype = torch.float64,
                  device=None) -> Spectrum:
    """ASVD (Yuan et al.): plain SVD of ``W·D`` with ``D = diag(rms activation)^α`` (from diag C_x), factors unscaled.

    The returned spectrum's ``factor_a`` is divided by ``D`` so truncations approximate ``W``
    itself; its eigenvalues are those of ``W·D`` (not loss units: use uniform allocation).
    ``w`` [m, n], ``cx`` [n, n] (only its diagonal is read), ``alpha`` the scaling exponent.
    """
    diag = torch.diagonal(cx)
    if not all_finite(diag):
        raise NonFiniteError("asvd: cx (the input covariance) has non-finite diagonal entries")
    d = diag.to(compute_dtype).clamp_min(0).sqrt().pow(alpha)
    pos = d > 0
    d = torch.where(pos, d, d[pos].min() if pos.any() else torch.ones_like(d))
    spec = spectrum(w.to(compute_dtype) * d.to(w.device), method="svd", compute_dtype=compute_dtype, device=device)
    spec.factor_a = spec.factor_a / d.to(spec.factor_a.device, spec.factor_a.dtype)
    spec.weight = w
    spec.method = "asvd"
    return spec
