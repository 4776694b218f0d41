"""Covariance scaling, relative damping and roots (Cholesky or eigen) with escalation.

All functions take batched covariances ``c`` [B, k, k] (symmetric, already in the compute
dtype and on the compute device) and a per-element relative damping ``alpha`` (a list of B
floats). Damping is relative to the mean diagonal: ``C ← C + α·mean(diag C)·I``; the callers
normalise every covariance to mean diagonal 1 first (:func:`normalize_cov`), so on the
normalised matrix it is simply ``C̃ + α·I``.

When a root cannot be taken (Cholesky not positive definite, non-finite eigen results) the
failing elements' α escalates ``×growth`` (from ``FIRST_ESCALATION`` when α = 0) up to
``damping_max``; past that a :class:`~obdk.errors.DataError` names the covariance. This is the
only damped Cholesky in obdk: single matrices go through :func:`cholesky_root`.
"""
from __future__ import annotations

import logging
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..errors import DataError, NonFiniteError
from ..finite import all_finite, finite_per_element  # noqa: F401  (re-exported: decompose's names)

logger = logging.getLogger(__name__)

#: First escalation step (relative) when the requested damping is 0.
FIRST_ESCALATION = 1e-6


def normalize_cov(c: Tensor, inplace: bool = False) -> Tuple[Tensor, Tensor]:
    """Scale each covariance to mean diagonal 1. ``c`` [B, k, k] → (``c / s`` [B, k, k], ``s`` [B]).

    ``s = mean(diag c)``; where that is not positive (an all-zero covariance) ``s = 1``, so
    relative damping still adds ``α·I`` there. ``inplace``: divide ``c`` itself (a buffer the
    caller owns) instead of a new tensor.
    """
    s = torch.diagonal(c, dim1=-2, dim2=-1).mean(-1)
    s = torch.where((s > 0) & torch.isfinite(s), s, torch.ones_like(s))
    return (c.div_(s[:, None, None]) if inplace else c / s[:, None, None]), s


def add_damping(c: Tensor, alpha: List[float]) -> Tensor:
    """``c + α_b·I`` per batch element. ``c`` [B, k, k] (normalised), ``alpha`` B floats → [B, k, k]."""
    if all(a == 0.0 for a in alpha):
        return c
    a = torch.tensor(alpha, dtype=c.dtype, device=c.device)
    k = c.shape[-1]
    out = c.expand(max(c.shape[0], a.shape[0]), k, k).clone()  # a copy; only the diagonal changes
    out.diagonal(dim1=-2, dim2=-1).add_(a[:, None])
    return out


def next_damping(alpha: float, growth: float) -> float:
    """The next relative damping after a failure: ``α·growth``, or ``FIRST_ESCALATION`` from 0."""
    return alpha * growth if alpha > 0 else FIRST_ESCALATION


def _escalate(alpha: List[float], idx: List[int], *, name: str, reason: str,
              damping_max: float, growth: float, fn: str = "") -> None:
    for i in idx:
        new = next_damping(alpha[i], growth)
        if new > damping_max:
            raise DataError(
                f"{fn + ': ' if fn else ''}{name}: {reason} even with relative damping {alpha[i]:g} "
                f"(next step {new:g} exceeds damping_max={damping_max:g}); {name} must be a finite positive "
                f"semi-definite covariance")
        logger.info("%s[%d]: %s at relative damping %g, escalating to %g", name, i, reason, alpha[i], new)
        alpha[i] = new


def damped_cholesky(c: Tensor, alpha: List[float], *, name: str, damping_max: float,
                    growth: float, fn: str = "") -> Tuple[Tensor, List[float]]:
    """Lower Cholesky factor of ``c + α·I``, escalating α per element until it exists.

    ``c`` [B, k, k] normalised covariance; ``alpha`` B floats (initial relative damping).
    Returns ``L`` [B, k, k] with ``L Lᵀ = c + α·I`` and the α actually used per element.
    Raises ``DataError`` naming ``name`` (prefixed by ``fn``) when α would exceed ``damping_max``.
    """
    alpha = list(alpha)
    out = torch.empty_like(c)
    todo = list(range(c.shape[0]))
    while todo:
        sub = c[todo] if len(todo) != c.shape[0] else c
        L, info = torch.linalg.cholesky_ex(add_damping(sub, [alpha[i] for i in todo]))
        ok = (info == 0) & finite_per_element(L)
        ok_list = ok.tolist()
        good = [j for j, o in enumerate(ok_list) if o]
        if good:
            out[[todo[j] for j in good]] = L[good]
        failed = [todo[j] for j, o in enumerate(ok_list) if not o]
        _escalate(alpha, failed, name=name, reason="Cholesky factorisation failed (not positive definite)",
                  damping_max=damping_max, growth=growth, fn=fn)
        todo = failed
    return out, alpha


def cholesky_root(c: Tensor, damping: float, *, name: str, damping_max: float = 1e4, growth: float = 10.0,
                  fn: str = "", compute_dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, float]:
    """Lower Cholesky factor of one covariance: ``S Sᵀ = C + α·mean(diag C)·I``, α escalating from ``damping``.

    ``c`` [k, k] symmetric PSD, not normalised (any scale); computed in ``compute_dtype``
    (default ``c``'s). The single-matrix form of :func:`damped_cholesky`, for callers outside
    the batched decompositions (whitened SVDs, the K-FAC correction, the sequential refit).
    Returns ``(S [k, k] lower, α used)``. Raises :class:`~obdk.errors.NonFiniteError` naming
    ``name`` when ``c`` is not finite, and ``DataError`` when α would exceed ``damping_max``.
    """
    if c.dim() != 2 or c.shape[0] != c.shape[1]:
        raise DataError(f"{fn + ': ' if fn else ''}{name}: need a square [k, k] covariance, got {tuple(c.shape)}")
    c = c.detach().to(compute_dtype or c.dtype)
    if not all_finite(c):
        raise NonFiniteError(f"{fn + ': ' if fn else ''}{name} contains non-finite values")
    if not torch.equal(c, c.T):
        c = 0.5 * (c + c.T)
    cn, s = normalize_cov(c.unsqueeze(0))
    L, alpha = damped_cholesky(cn, [float(damping)], name=name, damping_max=damping_max, growth=growth, fn=fn)
    if alpha[0] > damping:
        logger.info("%s: damping escalated from %g to %g", name, damping, alpha[0])
    return L[0] * s[0].sqrt(), alpha[0]


def eigh_desc(k: Tensor) -> Tuple[Tensor, Tensor]:
    """Eigen-decomposition of symmetric ``k`` [B, p, p], eigenvalues descending.

    Returns (``lam`` [B, p], ``vec`` [B, p, p]). Raises ``torch.linalg.LinAlgError`` or
    ``RuntimeError`` when the solver fails; callers check finiteness themselves.
    """
    lam, vec = torch.linalg.eigh(k)
    return lam.flip(-1), vec.flip(-1)


def damped_eigen_root(c: Tensor, alpha: List[float], *, name: str, damping_max: float,
                      growth: float, fn: str = "") -> Tuple[Tensor, List[float]]:
    """A root ``S`` of ``c + α·I`` from its eigen-decomposition (works for singular ``c``).

    ``c`` [B, k, k] normalised covariance; ``alpha`` B floats. Returns ``S = Q·diag(√max(d, 0))``
    [B, k, k] with ``S Sᵀ = c + α·I`` (eigenvalues clamped at 0), and the α used; α escalates
    only when the eigen solver fails or returns non-finite values.
    """
    alpha = list(alpha)
    while True:
        try:
            d, q = torch.linalg.eigh(add_damping(c, alpha))
            ok = finite_per_element(d) & finite_per_element(q)
            failed = [i for i, o in enumerate(ok.tolist()) if not o]
        except (torch.linalg.LinAlgError, RuntimeError):  # which element failed is unknown
            failed = list(range(c.shape[0]))
        if not failed:
            top = d[:, -1:].clamp_min(0)
            if bool((d[:, :1] < -(torch.finfo(d.dtype).eps ** 0.5) * top).any()):
                logger.warning("%s is indefinite (eigenvalue %.3g against a largest %.3g); its negative part is "
                               "clamped to 0", name, float(d[:, 0].min()), float(top.max()))
            return q * d.clamp_min(0).sqrt()[:, None, :], alpha
        _escalate(alpha, failed, name=name, reason="eigen-decomposition failed (non-finite results)",
                  damping_max=damping_max, growth=growth, fn=fn)


def try_cholesky(c: Tensor, alpha: List[float]) -> Optional[Tensor]:
    """Lower Cholesky factor of ``c + α·I`` [B, k, k] if it exists for every element, else None (no escalation)."""
    L, info = torch.linalg.cholesky_ex(add_damping(c, alpha))
    if bool((info != 0).any()) or not all_finite(L):
        return None
    return L
