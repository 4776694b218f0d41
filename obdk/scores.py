"""Per-component scores from the model's loss, the inputs of the ``zero-sum`` and ``bsi`` allocations.

Every whitening's spectrum is viewed as ``W = Σ σ_i u_i x_iᵀ``
(:func:`obdk.decompose.whitened.spectrum_as_svd`), so both scores are defined for SVD,
SVD-LLM and OBD alike:

* ZS-SVD (arXiv 2602.02848): ``δ_i = −σ_i ∂L/∂σ_i``, the first-order loss change of removing
  component ``i``, from the summed weight gradient ``G = ∂L/∂W`` (``g_i = u_iᵀ G x_i``).
* BSI (arXiv 2605.01627): ``−g_i σ_i + ½ h_ii σ_i²`` with ``h_ii`` the Hessian diagonal in σ,
  estimated by Hutchinson with symmetric differences,
  ``diag(H) ≈ E_z[z ⊙ (∇L(σ+εz) − ∇L(σ−εz))/(2ε)]``, ``z`` Rademacher, all targeted matrices
  perturbed at once.

This module runs the model (through :func:`obdk.calibrate.head.summed_weight_grads`);
:mod:`obdk.allocate` turns the scores into ranks without touching a model.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Union

import torch
import torch.nn as nn
from torch import Tensor

from .calibrate.head import summed_weight_grads
from .decompose.whitened import WhitenedSVD, spectrum_as_svd, whitened_svd
from .errors import ConfigError, DataError

log = logging.getLogger(__name__)

__all__ = ["ZSScores", "zero_sum_scores", "zero_sum_deltas", "hutchinson_diag", "bsi_importance", "BSIScores",
           "bsi_scores"]

Sigma = Union[Tensor, Mapping[str, Tensor]]


@dataclass
class ZSScores(WhitenedSVD):
    """A :class:`~obdk.decompose.whitened.WhitenedSVD` plus ZS-SVD's scores.

    ``grad_sigma`` [k]: ``g_i = u_iᵀ H v_i`` (the loss gradient in σ);
    ``delta`` [k]: ``δ_i = −σ_i g_i``, the first-order loss change of removing component ``i``.
    Truncate with :meth:`factors` (``b = U_r Σ_r``, ``a = V_rᵀ S⁻¹``).
    """
    grad_sigma: Optional[Tensor] = None
    delta: Optional[Tensor] = None


def zero_sum_scores(weight: Tensor, grad: Tensor, cx: Optional[Tensor], *, damping: float = 0.01,
                    compute_dtype: torch.dtype = torch.float64) -> ZSScores:
    """ZS-SVD component scores of one Linear.

    ``weight``: [m, n]; ``grad``: ``∂L/∂W`` [m, n] (e.g. from
    :func:`~obdk.calibrate.head.summed_weight_grads`); ``cx``: [n, n] input Gram or
    ``None`` (plain SVD). ``S`` is the lower Cholesky factor of ``C_x + α·mean(diag)·I``
    (α from ``damping``, escalated ×10 until it exists). ``H = G S⁻ᵀ`` is a triangular
    solve. Returns :class:`ZSScores` with ``k = min(m, n)`` components in ``compute_dtype``.
    """
    if tuple(grad.shape) != tuple(weight.shape):
        raise DataError(f"zero_sum_scores: grad shape {tuple(grad.shape)} != weight shape {tuple(weight.shape)}")
    dec = whitened_svd(weight, cx, damping=damping, compute_dtype=compute_dtype)
    g = dec.grad_sigma(grad.detach().to(dec.u.device))  # u_iᵀ G S⁻ᵀ v_i = u_iᵀ H v_i
    return ZSScores(u=dec.u, sigma=dec.sigma, v=dec.v, chol=dec.chol, damping=dec.damping,
                    grad_sigma=g, delta=-dec.sigma * g)


def zero_sum_deltas(spectra: Mapping[str, object], grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """ZS-SVD's ``δ_i = −σ_i ∂L/∂σ_i`` [k] per matrix, from its spectrum and summed gradient ``G`` [m, n] (CPU)."""
    out = {}
    for name, spec in spectra.items():
        ws = spectrum_as_svd(spec)
        out[name] = (-ws.sigma * ws.grad_sigma(grads[name].to(ws.u.device))).cpu()
    return out


def _flatten(x: Sigma, keys: Optional[list[str]]) -> Tensor:
    if keys is None:
        return x.reshape(-1)
    return torch.cat([x[k].reshape(-1) for k in keys])


def _unflatten(flat: Tensor, like: Sigma, keys: Optional[list[str]]) -> Sigma:
    if keys is None:
        return flat.reshape(like.shape)
    out, o = {}, 0
    for k in keys:
        n = like[k].numel()
        out[k] = flat[o:o + n].reshape(like[k].shape)
        o += n
    return out


def hutchinson_diag(grad_fn: Callable[[Sigma], Sigma], sigma: Sigma, *, probes: int = 8, eps: float = 1e-3,
                    generator: Optional[torch.Generator] = None) -> tuple[Sigma, Sigma]:
    """Hutchinson estimate of the Hessian diagonal from gradient differences.

    ``grad_fn(σ) -> ∇L(σ)`` with the structure of ``sigma`` (a tensor, or a dict of
    tensors perturbed jointly as one vector). Per probe ``z`` (Rademacher, drawn
    on CPU from ``generator``) the estimate is ``z ⊙ (∇L(σ+εz) − ∇L(σ−εz))/(2ε)``,
    unbiased for ``diag(H)`` on a quadratic (and up to ``O(ε²)`` otherwise).
    Returns ``(mean, var)`` in the structure of ``sigma``: the average over
    ``probes`` and the per-coordinate variance *of that average* (sample variance
    / probes; NaN when ``probes == 1``). Costs ``2·probes`` calls of ``grad_fn``.
    """
    if probes < 1:
        raise DataError(f"hutchinson_diag: probes must be >= 1, got {probes}")
    if eps <= 0:
        raise DataError(f"hutchinson_diag: eps must be > 0, got {eps}")
    keys = list(sigma.keys()) if isinstance(sigma, Mapping) else None
    x = _flatten(sigma, keys)
    mean = torch.zeros_like(x)
    m2 = torch.zeros_like(x)
    for p in range(probes):
        z = (torch.randint(0, 2, x.shape, generator=generator) * 2 - 1).to(x.device, x.dtype)
        gp = _flatten(grad_fn(_unflatten(x + eps * z, sigma, keys)), keys).to(x.dtype)
        gm = _flatten(grad_fn(_unflatten(x - eps * z, sigma, keys)), keys).to(x.dtype)
        est = z * (gp - gm) / (2 * eps)
        d = est - mean  # Welford
        mean += d / (p + 1)
        m2 += d * (est - mean)
    var = m2 / (probes - 1) / probes if probes > 1 else torch.full_like(x, float("nan"))
    return _unflatten(mean, sigma, keys), _unflatten(var, sigma, keys)


def bsi_importance(sigma: Tensor, g: Tensor, h_diag: Tensor) -> Tensor:
    """Importance of each basis ``−g_i σ_i + ½ h_ii σ_i²`` (predicted loss increase of removing it).

    ``sigma``, ``g`` (∂L/∂σ), ``h_diag`` (∂²L/∂σ²): [k] → [k].
    """
    return -g * sigma + 0.5 * h_diag * sigma * sigma


@dataclass
class BSIScores:
    """Per-matrix BSI scores, all [k] fp64: ``importance`` and its variance ``importance_var``
    (from the Hutchinson variance, ``¼σ⁴·h_var``), ``grad`` (∂L/∂σ), ``h_diag`` and ``h_var``."""
    importance: Tensor
    importance_var: Tensor
    grad: Tensor
    h_diag: Tensor
    h_var: Tensor


def bsi_scores(model: nn.Module, input_ids: Tensor, decomps: Mapping[str, WhitenedSVD], *, probes: int = 8,
               eps: float = 1e-3, attention_mask: Optional[Tensor] = None, batch_size: int = 1,
               generator: Optional[torch.Generator] = None, progress: bool = False) -> dict[str, BSIScores]:
    """BSI importance of every basis of every targeted matrix, from the model's loss.

    ``input_ids`` [N, T] (+ ``attention_mask``): calibration windows; ``decomps``:
    ``{module name: WhitenedSVD}`` (e.g. from :func:`~obdk.decompose.whitened.whitened_svd`)
    of the modules' weights. The weights are set to ``W(σ') = U diag(σ') Vᵀ S⁻¹`` for
    all matrices at once; ``∇_σ L`` comes from :func:`summed_weight_grads` projected
    with ``g_i = u_iᵀ G S⁻ᵀ v_i``. One pass at ``σ`` gives ``g``, ``2·probes`` passes
    at ``σ ± εz`` give the Hutchinson ``diag(H)``. The original weights are restored
    afterwards (also on error). ``progress``: a bar over the ``1 + 2·probes`` gradient passes.
    Returns ``{name: BSIScores}`` ([k] fp64 each).
    """
    if not decomps:
        raise ConfigError("bsi_scores: no decompositions given")
    modules = dict(model.named_modules())
    names = list(decomps)
    originals = {}
    for nm in names:
        w = getattr(modules.get(nm), "weight", None)
        if not isinstance(w, Tensor) or tuple(w.shape) != decomps[nm].shape:
            raise DataError(f"bsi_scores: {nm!r} has no weight of shape {decomps[nm].shape}")
        originals[nm] = w.detach().clone()

    def grad_fn(sig: Mapping[str, Tensor]) -> dict[str, Tensor]:
        with torch.no_grad():
            for nm in names:
                w = modules[nm].weight
                w.copy_(decomps[nm].weight(sig[nm]).to(w.device, w.dtype))
        grads = summed_weight_grads(model, input_ids, names, attention_mask=attention_mask, batch_size=batch_size)
        bar.update(1)
        return {nm: decomps[nm].grad_sigma(grads[nm].to(decomps[nm].u.device)) for nm in names}

    sigma = {nm: decomps[nm].sigma for nm in names}
    from tqdm.auto import tqdm
    bar = tqdm(total=1 + 2 * int(probes), desc="bsi [gradient + Hutchinson probes]", unit="pass",
               disable=not progress, leave=False)
    try:
        g = grad_fn(sigma)
        h, hv = hutchinson_diag(grad_fn, sigma, probes=probes, eps=eps, generator=generator)
    finally:
        bar.close()
        with torch.no_grad():
            for nm in names:
                modules[nm].weight.copy_(originals[nm])
    out = {}
    for nm in names:
        s = decomps[nm].sigma
        out[nm] = BSIScores(importance=bsi_importance(s, g[nm], h[nm]), importance_var=0.25 * s ** 4 * hv[nm],
                            grad=g[nm], h_diag=h[nm], h_var=hv[nm])
    log.info("bsi_scores: %d matrices, %d probes (eps %g), %d windows", len(names), probes, eps, input_ids.shape[0])
    return out
