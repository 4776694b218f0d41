"""The input-whitened SVD that ZS-SVD and BSI score components in, and any spectrum seen as one.

``W S = U diag(σ) Vᵀ`` with ``S Sᵀ = C_x`` (``S`` the lower Cholesky factor of the
damped input Gram), so ``W = U diag(σ) Vᵀ S⁻¹ = Σ_i σ_i u_i x_iᵀ`` with
``x_i = S⁻ᵀ v_i``. ``S = I`` (no ``C_x``) is the plain SVD. ``S⁻¹`` is never formed:
every product with it is a triangular solve.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ..errors import ConfigError, DataError
from .roots import cholesky_root

log = logging.getLogger(__name__)

__all__ = ["WhitenedSVD", "whitened_svd", "spectrum_as_svd"]

Index = Union[int, Sequence[int], Tensor, None]


@dataclass
class WhitenedSVD:
    """``W ≈ U diag(σ) Vᵀ S⁻¹``; all fp64 (or the compute dtype).

    ``u`` [m, k], ``sigma`` [k] descending, ``v`` [n, k], ``chol`` [n, n] lower
    triangular ``S`` or ``None`` (identity), ``damping`` the relative α used.
    """
    u: Tensor
    sigma: Tensor
    v: Tensor
    chol: Optional[Tensor] = None
    damping: float = 0.0

    def __post_init__(self) -> None:
        self._x: Optional[Tensor] = None

    @property
    def shape(self) -> tuple[int, int]:
        """``(m, n)`` of the weight."""
        return self.u.shape[0], self.v.shape[0]

    @property
    def right(self) -> Tensor:
        """``Vᵀ S⁻¹`` [k, n] (computed once by a triangular solve; ``Vᵀ`` when ``S = I``)."""
        if self._x is None:
            if self.chol is None:
                self._x = self.v.T.contiguous()
            else:  # X S = Vᵀ  <=>  Sᵀ Xᵀ = V
                self._x = torch.linalg.solve_triangular(self.chol.T, self.v, upper=True).T.contiguous()
        return self._x

    def _index(self, rank: Optional[int], indices: Index) -> Tensor:
        k = self.sigma.numel()
        if indices is not None:
            if rank is not None:
                raise ConfigError("give rank or indices, not both")
            idx = torch.as_tensor(indices, dtype=torch.long, device=self.sigma.device).reshape(-1)
        else:
            idx = torch.arange(k if rank is None else rank, device=self.sigma.device)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= k):
            raise DataError(f"component indices must lie in [0, {k}), got min {int(idx.min())} max {int(idx.max())}")
        return idx

    def factors(self, rank: Optional[int] = None, indices: Index = None) -> tuple[Tensor, Tensor]:
        """``(a [r, n], b [m, r])`` with ``b a = Σ_{i ∈ kept} σ_i u_i x_iᵀ``: ``b = U_r Σ_r``, ``a = V_rᵀ S⁻¹``.

        Keeps the top ``rank`` components, or exactly ``indices`` (BSI); all when both are ``None``.
        """
        idx = self._index(rank, indices)
        return self.right[idx].clone(), self.u[:, idx] * self.sigma[idx]

    def weight(self, sigma: Optional[Tensor] = None, rank: Optional[int] = None, indices: Index = None) -> Tensor:
        """Dense ``U diag(σ') Vᵀ S⁻¹`` [m, n] for singular values ``sigma`` (default: own) over kept components."""
        idx = self._index(rank, indices)
        s = (self.sigma if sigma is None else sigma.to(self.sigma.dtype))[idx]
        return (self.u[:, idx] * s) @ self.right[idx]

    def grad_sigma(self, grad: Tensor) -> Tensor:
        """Gradient in σ from a weight gradient ``G = ∂L/∂W`` [m, n]: ``g_i = u_iᵀ G S⁻ᵀ v_i`` → [k]."""
        if tuple(grad.shape) != self.shape:
            raise DataError(f"grad_sigma: gradient shape {tuple(grad.shape)} != weight shape {self.shape}")
        g = grad.to(self.u.dtype)
        return ((self.u.T @ g) * self.right).sum(dim=1)


def whitened_svd(weight: Tensor, cx: Optional[Tensor] = None, *, chol: Optional[Tensor] = None,
                 damping: float = 0.01, compute_dtype: torch.dtype = torch.float64) -> WhitenedSVD:
    """SVD of the input-whitened weight ``W S`` (``S Sᵀ = C_x + α·mean(diag)·I``, lower Cholesky).

    ``weight``: [m, n]; ``cx``: [n, n] input Gram or ``None`` (plain SVD, ``S = I``);
    ``chol``: a precomputed lower ``S`` [n, n] instead of ``cx``. Returns a
    :class:`WhitenedSVD` with ``k = min(m, n)`` components in ``compute_dtype``.
    """
    if weight.dim() != 2:
        raise DataError(f"whitened_svd: weight must be [m, n], got {tuple(weight.shape)}")
    if cx is not None and chol is not None:
        raise DataError("whitened_svd: give cx or chol, not both")
    w = weight.detach().to(compute_dtype)
    n = w.shape[1]
    alpha = 0.0
    if cx is not None:
        if tuple(cx.shape) != (n, n):
            raise DataError(f"whitened_svd: C_x must be [{n}, {n}], got {tuple(cx.shape)}")
        chol, alpha = cholesky_root(cx.to(w.device), damping, name="C_x", fn="whitened_svd",
                                    compute_dtype=compute_dtype)
    elif chol is not None:
        if tuple(chol.shape) != (n, n):
            raise DataError(f"whitened_svd: chol must be [{n}, {n}], got {tuple(chol.shape)}")
        chol = chol.detach().to(w.device, compute_dtype)
    a = w if chol is None else w @ chol
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return WhitenedSVD(u=u, sigma=s, v=vh.T.contiguous(), chol=chol, damping=alpha)


def spectrum_as_svd(spec):
    """View a :class:`obdk.decompose.Spectrum` as an :class:`WhitenedSVD`.

    Component i of any whitening is ``b_i a_iᵀ``; with ``σ_i = ‖b_i‖‖a_i‖`` and unit
    ``u_i = b_i/‖b_i‖``, ``x_i = a_i/‖a_i‖`` the weight is ``Σ σ_i u_i x_iᵀ``, so ZS-SVD's
    ``δ_i = −σ_i ∂L/∂σ_i`` and BSI's importance are defined for SVD, SVD-LLM and OBD alike
    (for SVD-LLM this is exactly ZS-SVD's whitened-coordinate score).
    """
    cached = getattr(spec, "_obdk_svd", None)
    if cached is not None:
        return cached
    b, a = spec.factor_b.double(), spec.factor_a.double()
    nb, na = b.norm(dim=0), a.norm(dim=1)
    tiny = torch.finfo(torch.float64).tiny
    u = b / nb.clamp_min(tiny)
    x = a / na.clamp_min(tiny)[:, None]
    ws = WhitenedSVD(u=u, sigma=nb * na, v=x.T.contiguous(), chol=None)
    spec._obdk_svd = ws
    return ws
