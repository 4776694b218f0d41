"""Basis-selection importance (BSI, arXiv 2605.01627).

With ``W = U diag(σ) Vᵀ S⁻¹`` (``S = I`` for the plain SVD) the loss change of
removing basis ``i`` (``σ_i → 0``) is, to second order,
``−g_i σ_i + ½ h_ii σ_i²`` with ``g_i = ∂L/∂σ_i = u_iᵀ G S⁻ᵀ v_i`` and ``h_ii`` the
Hessian diagonal in σ (the scores come from :mod:`obdk.scores`). Bases are ranked by
importance, not spectral order, so :func:`allocate_bsi` returns kept index sets.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch
from torch import Tensor

from ..errors import ConfigError
from .budget import Allocation, MatrixSpec, _check_specs, budget, max_factored_rank, total_params
from .knapsack import DP_LIMIT, floor_rank, rank_choices, solve_choices, suffix_sums

log = logging.getLogger(__name__)

__all__ = ["allocate_bsi"]


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
        raise ConfigError(f"allocate_bsi: order must be 'importance' or 'spectral', got {order!r}")
    _check_specs(specs)
    missing = [s.name for s in specs if s.importance is None]
    if missing:
        raise ConfigError(f"allocate_bsi needs importance for every matrix; missing for {missing[:5]}")
    if multiple < 1:
        raise ConfigError(f"allocate_bsi: multiple must be >= 1, got {multiple}")
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




def spec_fields(scores, config, costs: Tensor) -> dict:
    """A target's :class:`MatrixSpec` fields from its :class:`~obdk.scores.BSIScores` and spectral ``costs`` [k].

    BSI removes bases only until the budget is met (its greedy never removes more); a negative estimate
    (Hutchinson noise) must not make removing extra bases "profitable": the importance of
    ``config.bsi_terms`` is clamped at 0 and ties are broken by the spectral cost, so equal scores drop the tail
    first."""
    imp = scores.terms(config.bsi_terms).double().cpu().clamp_min(0)
    return {"importance": imp + 1e-12 * costs[: imp.numel()]}


def from_config(specs: Sequence[MatrixSpec], config) -> Allocation:
    """:func:`allocate_bsi` at ``config``'s ``keep``, ``rank_multiple``, ``floor`` and ``bsi_order`` (its entry in
    :data:`obdk.registry.ALLOCATORS`)."""
    return allocate_bsi(specs, config.keep, multiple=config.rank_multiple, floor=config.floor,
                        order=config.bsi_order)
