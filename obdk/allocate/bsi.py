"""Basis-selection importance (BSI, arXiv 2605.01627).

With ``W = U diag(σ) Vᵀ S⁻¹`` (``S = I`` for the plain SVD) the loss change of
removing basis ``i`` (``σ_i → 0``) is, to second order,
``−g_i σ_i + ½ h_ii σ_i²`` with ``g_i = ∂L/∂σ_i = u_iᵀ G S⁻ᵀ v_i`` and ``h_ii`` the
Hessian diagonal in σ, estimated by Hutchinson with symmetric differences:
``diag(H) ≈ E_z[z ⊙ (∇L(σ+εz) − ∇L(σ−εz))/(2ε)]``, ``z`` Rademacher, all targeted
matrices perturbed at once. Bases are ranked by importance, not spectral
order, so :func:`allocate_bsi` returns kept index sets.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch import Tensor

from .budget import Allocation, MatrixSpec, _check_specs, budget, max_factored_rank, total_params
from .grads import summed_weight_grads
from .knapsack import DP_LIMIT, rank_choices, floor_rank, solve_choices, suffix_sums
from .svd import WhitenedSVD

log = logging.getLogger(__name__)

__all__ = ["hutchinson_diag", "bsi_importance", "allocate_bsi", "bsi_scores", "BSIScores"]

Sigma = Union[Tensor, Mapping[str, Tensor]]


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
        raise ValueError(f"hutchinson_diag: probes must be >= 1, got {probes}")
    if eps <= 0:
        raise ValueError(f"hutchinson_diag: eps must be > 0, got {eps}")
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


def allocate_bsi(specs: Sequence[MatrixSpec], keep: float, multiple: int = 1, *, floor: float = 0.0,
                 method: str = "auto", dp_limit: int = DP_LIMIT, order: str = "importance") -> Allocation:
    """Keep the most important bases of each matrix under the budget ``keep·Σ mn``.

    ``specs[*].importance`` [≤ min(m, n)] (index = spectral component; missing entries
    count 0) are predicted loss increases of removing each basis, in any order and
    of any sign. Keeping ``r`` bases of a matrix, the best are its ``r`` most
    important, so its predicted loss is the sum of the ``k − r`` smallest
    importances: with importances sorted descending that is exactly the tail-sum
    form of :func:`~obdk.allocate.allocate_global`, solved by the same knapsack
    (break-even accounting, ranks multiples of ``multiple`` above
    ``floor × keep·mn/(m+n)``, dense = all bases, loss 0). This replaces the
    paper's globally-sorted greedy removal by the (near-)optimal choice under
    the same objective; negative-importance bases are dropped when that helps.

    ``order="spectral"`` keeps the spectral order instead: a matrix at rank ``r`` keeps its top
    ``r`` components and its predicted loss is the sum of the importances of the tail, so BSI
    only decides *how many* components each matrix keeps (ranks), never *which*. With few
    Hutchinson probes the second-order estimate of removing a top component (a large move in
    σ) is noisy and can be small or negative; in importance order such a component can be
    dropped first.

    ``meta["kept_indices"][name]``: ascending LongTensor of kept component indices
    (all ``min(m, n)`` when dense); ``ranks[name]`` is its length or ``None``.
    """
    if order not in ("importance", "spectral"):
        raise ValueError(f"allocate_bsi: order must be 'importance' or 'spectral', got {order!r}")
    _check_specs(specs)
    missing = [s.name for s in specs if s.importance is None]
    if missing:
        raise ValueError(f"allocate_bsi needs importance for every matrix; missing for {missing[:5]}")
    if multiple < 1:
        raise ValueError(f"allocate_bsi: multiple must be >= 1, got {multiple}")
    B = budget(specs, keep)
    opts, orders = [], []
    for s in specs:
        imp = torch.zeros(s.full_rank, dtype=torch.float64)
        imp[: s.importance.numel()] = s.importance
        idx = (torch.sort(imp, descending=True, stable=True).indices if order == "importance"
               else torch.arange(s.full_rank))
        orders.append(idx)
        tails = suffix_sums(imp[idx], s.full_rank)
        lo, hi = floor_rank(s.m, s.n, keep, floor, multiple), max_factored_rank(s.m, s.n, multiple)
        opts.append(rank_choices(s, tails, lo, hi, multiple))
    labels, meta = solve_choices(opts, B, method=method, dp_limit=dp_limit)
    ranks_out, kept = {}, {}
    for s, r, idx in zip(specs, labels, orders):
        ranks_out[s.name] = r
        kept[s.name] = torch.sort(idx if r is None else idx[:r]).values
    meta.update(kept_indices=kept, floor=floor, multiple=multiple, order=order)
    log.info("BSI allocation at keep=%.4f: %d of %.0f params, predicted loss %.6g, %d dense",
             keep, meta["params"], B, meta["loss"], sum(r is None for r in labels))
    return Allocation(ranks=ranks_out, params=meta["params"], budget=B, total_params=total_params(specs),
                      predicted_loss=meta["loss"], strategy="bsi", meta=meta)


def bsi_scores(model: nn.Module, input_ids: Tensor, decomps: Mapping[str, WhitenedSVD], *, probes: int = 8,
               eps: float = 1e-3, attention_mask: Optional[Tensor] = None, batch_size: int = 1,
               generator: Optional[torch.Generator] = None) -> dict[str, BSIScores]:
    """BSI importance of every basis of every targeted matrix, from the model's loss.

    ``input_ids`` [N, T] (+ ``attention_mask``): calibration windows; ``decomps``:
    ``{module name: WhitenedSVD}`` (e.g. from :func:`~obdk.allocate.svd.whitened_svd`)
    of the modules' weights. The weights are set to ``W(σ') = U diag(σ') Vᵀ S⁻¹`` for
    all matrices at once; ``∇_σ L`` comes from :func:`summed_weight_grads` projected
    with ``g_i = u_iᵀ G S⁻ᵀ v_i``. One pass at ``σ`` gives ``g``, ``2·probes`` passes
    at ``σ ± εz`` give the Hutchinson ``diag(H)``. The original weights are restored
    afterwards (also on error). Returns ``{name: BSIScores}`` ([k] fp64 each).
    """
    if not decomps:
        raise ValueError("bsi_scores: no decompositions given")
    modules = dict(model.named_modules())
    names = list(decomps)
    originals = {}
    for nm in names:
        w = getattr(modules.get(nm), "weight", None)
        if not isinstance(w, Tensor) or tuple(w.shape) != decomps[nm].shape:
            raise ValueError(f"bsi_scores: {nm!r} has no weight of shape {decomps[nm].shape}")
        originals[nm] = w.detach().clone()

    def grad_fn(sig: Mapping[str, Tensor]) -> dict[str, Tensor]:
        with torch.no_grad():
            for nm in names:
                w = modules[nm].weight
                w.copy_(decomps[nm].weight(sig[nm]).to(w.device, w.dtype))
        grads = summed_weight_grads(model, input_ids, names, attention_mask=attention_mask, batch_size=batch_size)
        return {nm: decomps[nm].grad_sigma(grads[nm].to(decomps[nm].u.device)) for nm in names}

    sigma = {nm: decomps[nm].sigma for nm in names}
    try:
        g = grad_fn(sigma)
        h, hv = hutchinson_diag(grad_fn, sigma, probes=probes, eps=eps, generator=generator)
    finally:
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
