"""Zero-sum allocation (ZS-SVD, arXiv 2602.02848; reference code mint-vu/Zero-Sum-SVD).

Scores: in the whitened SVD ``W S = U Σ Vᵀ`` (``S Sᵀ = C_x``) the first-order loss
change of removing component ``i`` is ``δ_i = −σ_i u_iᵀ H v_i`` with ``H = G S⁻ᵀ``,
``G = ∂L/∂W``. Allocation: every matrix offers its smallest remaining component;
the candidates sit in two heaps (``δ >= 0`` and ``δ < 0``, each popping the
smallest ``|δ|``); while the running sum of removed ``δ`` is ``<= 0`` the positive
heap is popped, otherwise the negative one, so the predicted loss change stays
near zero; removal stops as soon as the budget is met. Optional correction: one
projected-gradient step back towards the dense weight, then re-truncation.
"""
from __future__ import annotations

import heapq
import logging
import math
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from .budget import Allocation, MatrixSpec, _check_specs, budget, max_factored_rank, total_params
from .svd import WhitenedSVD, whitened_svd

log = logging.getLogger(__name__)

__all__ = ["ZSScores", "zero_sum_scores", "allocate_zero_sum", "zs_correct", "ZSCorrection", "gradient_step"]


@dataclass
class ZSScores(WhitenedSVD):
    """A :class:`~obdk.allocate.svd.WhitenedSVD` plus ZS-SVD's scores.

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
    :func:`~obdk.allocate.grads.summed_weight_grads`); ``cx``: [n, n] input Gram or
    ``None`` (plain SVD). ``S`` is the lower Cholesky factor of ``C_x + α·mean(diag)·I``
    (α from ``damping``, escalated ×10 until it exists). ``H = G S⁻ᵀ`` is a triangular
    solve. Returns :class:`ZSScores` with ``k = min(m, n)`` components in ``compute_dtype``.
    """
    if tuple(grad.shape) != tuple(weight.shape):
        raise ValueError(f"zero_sum_scores: grad shape {tuple(grad.shape)} != weight shape {tuple(weight.shape)}")
    dec = whitened_svd(weight, cx, damping=damping, compute_dtype=compute_dtype)
    g = dec.grad_sigma(grad.detach().to(dec.u.device))  # u_iᵀ G S⁻ᵀ v_i = u_iᵀ H v_i
    return ZSScores(u=dec.u, sigma=dec.sigma, v=dec.v, chol=dec.chol, damping=dec.damping,
                    grad_sigma=g, delta=-dec.sigma * g)


def _zs_params(m: int, n: int, rank: int, rmax: int) -> int:
    return m * n if rank > rmax else rank * (m + n)


def allocate_zero_sum(specs: Sequence[MatrixSpec], keep: float, *, min_rank_ratio: float = 0.0,
                      record_trace: bool = False) -> Allocation:
    """ZS-SVD's two-heap zero-sum removal under the budget ``keep·Σ mn``.

    ``specs[*].deltas`` [≤ min(m, n)] in spectral order (index 0 = largest σ; missing
    tail entries count 0). Each matrix starts with all ``min(m, n)`` components and
    offers its last remaining one. Candidates with ``δ >= 0`` go to one heap and
    ``δ < 0`` to the other, each ordered by ``|δ|`` ascending. Before every removal:
    if the running sum of removed ``δ`` is ``<= 0`` pop the positive heap, else the
    negative one (the other when the preferred heap is empty); stop once
    ``Σ params <= budget``. A matrix never goes below
    ``max(1, ceil(min_rank_ratio · r_max))`` where ``r_max`` is its largest rank
    that saves parameters; ``ValueError`` when those minimum ranks alone exceed the budget.

    Budget accounting (exact, as :mod:`~obdk.allocate.budget`): a matrix at rank
    ``r`` costs ``m·n`` while ``r > r_max`` (removals there save nothing until the
    break-even crossing, which saves ``mn − r_max(m+n)``), and ``r·(m+n)`` after.
    The reference code prices the crossing one component late (a matrix at rank
    ``r < r*`` is counted as ``(r+1)(m+n)``), i.e. it removes one extra component
    per factorised matrix; here the price is exact. As in the reference, a matrix
    that ends above ``r_max`` is restored to dense (``None``) and its removals are undone.

    ``predicted_loss`` = Σ δ of the components actually removed. ``meta``:
    ``running_sum`` (heap running sum incl. undone removals), ``restored`` (names
    reverted to dense), ``min_ranks``, ``removed`` (count per matrix) and, with
    ``record_trace``, ``trace``: one dict per removal (``name``, ``index``, ``delta``,
    ``running_before``, ``pos_available``, ``neg_available``).
    """
    _check_specs(specs)
    missing = [s.name for s in specs if s.deltas is None]
    if missing:
        raise ValueError(f"allocate_zero_sum needs deltas for every matrix; missing for {missing[:5]}")
    B = budget(specs, keep)
    J = len(specs)
    deltas, rank, rmax, lo = [], [], [], []
    for s in specs:
        d = torch.zeros(s.full_rank, dtype=torch.float64)
        d[: s.deltas.numel()] = s.deltas
        deltas.append(d.tolist())
        rank.append(s.full_rank)
        rm = max_factored_rank(s.m, s.n)
        rmax.append(rm)
        lo.append(max(1, math.ceil(min_rank_ratio * rm - 1e-9)))
    floor_params = sum(lo[j] * (s.m + s.n) for j, s in enumerate(specs))
    if floor_params > B:
        raise ValueError(f"infeasible budget: the minimum ranks alone cost {floor_params} params > budget {B:.0f}; "
                         f"lower min_rank_ratio or raise keep")
    P = sum(s.dense_params for s in specs)
    pos: list[tuple[float, int, int]] = []
    neg: list[tuple[float, int, int]] = []
    counter = 0

    def offer(j: int) -> None:
        nonlocal counter
        if rank[j] > lo[j]:
            d = deltas[j][rank[j] - 1]
            heapq.heappush(pos if d >= 0 else neg, (abs(d), counter, j))
            counter += 1

    for j in range(J):
        offer(j)
    running = 0.0
    trace: list[dict[str, Any]] = []
    removed = [0] * J
    while P > B and (pos or neg):
        prefer = pos if running <= 0.0 else neg
        heap = prefer if prefer else (neg if prefer is pos else pos)
        _, _, j = heapq.heappop(heap)
        s = specs[j]
        idx = rank[j] - 1
        d = deltas[j][idx]
        if record_trace:
            trace.append({"name": s.name, "index": idx, "delta": d, "running_before": running,
                          "pos_available": bool(pos) or heap is pos, "neg_available": bool(neg) or heap is neg})
        before = _zs_params(s.m, s.n, rank[j], rmax[j])
        rank[j] -= 1
        removed[j] += 1
        P += _zs_params(s.m, s.n, rank[j], rmax[j]) - before
        running += d
        offer(j)
    assert P <= B, (P, B)  # feasible: the minimum ranks fit, and every matrix can reach them
    ranks: dict[str, Optional[int]] = {}
    restored, loss = [], 0.0
    for j, s in enumerate(specs):
        if rank[j] > rmax[j]:
            ranks[s.name] = None
            if removed[j]:
                restored.append(s.name)
        else:
            ranks[s.name] = rank[j]
            loss += sum(deltas[j][rank[j]:])
    used = sum(s.dense_params if ranks[s.name] is None else ranks[s.name] * (s.m + s.n) for s in specs)
    meta: dict[str, Any] = {"running_sum": running, "restored": restored, "min_rank_ratio": min_rank_ratio,
                            "min_ranks": {s.name: lo[j] for j, s in enumerate(specs)},
                            "removed": {s.name: removed[j] for j, s in enumerate(specs)}}
    if record_trace:
        meta["trace"] = trace
    log.info("zero-sum allocation at keep=%.4f: %d of %.0f params, Σδ removed %.6g, %d dense (%d restored)",
             keep, used, B, loss, sum(r is None for r in ranks.values()), len(restored))
    return Allocation(ranks=ranks, params=used, budget=B, total_params=total_params(specs),
                      predicted_loss=loss, strategy="zero_sum", meta=meta)


class ZSCorrection(NamedTuple):
    """Corrected factors ``a`` [r, n], ``b`` [m, r] and the step ``coef = ⟨g,Δ⟩/⟨g,g⟩``."""
    a: Tensor
    b: Tensor
    coef: float


def gradient_step(weight: Tensor, wr: Tensor, grad: Tensor, *, chol_x: Optional[Tensor] = None,
                  chol_g: Optional[Tensor] = None) -> tuple[Tensor, float]:
    """The dense step of a one-step correction: ``W' = W_r + c·P``, returns ``(W', c)``.

    ``weight`` ``W`` [m, n], ``wr`` the truncation ``W_r`` [m, n], ``grad`` ``G = ∂L/∂W`` at
    ``W_r`` [m, n], all in the compute dtype. ``chol_x`` [n, n] / ``chol_g`` [m, m]: lower
    Cholesky factors of the damped ``C_x`` / ``C_g`` (None = identity). The direction is
    ``P = C_g⁻¹ G C_x⁻¹`` (two triangular solves each, no inverse; ``P = G`` without factors,
    ZS-SVD's step) and ``c = ⟨G, Δ⟩ / ⟨G, P⟩`` with ``Δ = W − W_r``: the ``c`` minimising
    ``‖W_r + cP − W‖²`` in the metric ``H = C_x ⊗ C_g`` (``HP = G``), i.e. the projection of
    what the truncation removed on the preconditioned gradient, in the geometry the
    truncation itself minimises. Where the loss is that quadratic (``G ∝ C_g(W_r − W)C_x``) the
    step lands on ``W`` exactly. A zero ``⟨G, P⟩`` gives ``c = 0``.
    """
    p = grad
    if chol_g is not None:
        p = torch.cholesky_solve(p, chol_g)
    if chol_x is not None:
        p = torch.cholesky_solve(p.T, chol_x).T
    gp = float((grad * p).sum())
    coef = float((grad * (weight - wr)).sum()) / gp if gp > 0 else 0.0
    return wr + coef * p, coef


def zs_correct(weight: Tensor, a: Tensor, b: Tensor, grad: Tensor, *, chol: Optional[Tensor] = None,
               compute_dtype: torch.dtype = torch.float64) -> ZSCorrection:
    """ZS-SVD's one-step correction of a truncation ``W_r = b a``, re-truncated to the same rank.

    ``weight``: dense ``W`` [m, n]; ``a`` [r, n], ``b`` [m, r]: the truncated factors;
    ``grad``: the loss gradient ``g = ∂L/∂W`` evaluated *at* ``W_r`` [m, n];
    ``chol``: the lower whitening factor ``S`` [n, n] the truncation was made in
    (``None`` = plain SVD). With ``Δ = W − W_r``, the step projects ``Δ`` on the
    gradient direction: ``W' = W_r + (⟨g,Δ⟩/⟨g,g⟩)·g`` (to first order it recovers
    the loss change ``⟨g, Δ⟩`` that moving back to ``W`` would give). ``W'`` is then
    truncated to rank ``r`` in the same whitened coordinates (SVD of ``W' S``).
    Returns :class:`ZSCorrection` with factors in ``a.dtype``; a zero gradient
    returns the input factors and ``coef = 0``.
    """
    m, n = weight.shape
    r = a.shape[0]
    if tuple(a.shape) != (r, n) or tuple(b.shape) != (m, r) or tuple(grad.shape) != (m, n):
        raise ValueError(f"zs_correct: need weight [m, n], a [r, n], b [m, r], grad [m, n]; got "
                         f"{tuple(weight.shape)}, {tuple(a.shape)}, {tuple(b.shape)}, {tuple(grad.shape)}")
    w = weight.detach().to(compute_dtype)
    wr = b.detach().to(compute_dtype) @ a.detach().to(compute_dtype)
    g = grad.detach().to(w.device, compute_dtype)
    if float((g * g).sum()) == 0.0:
        return ZSCorrection(a.detach().clone(), b.detach().clone(), 0.0)
    wc, coef = gradient_step(w, wr, g)
    dec = whitened_svd(wc, chol=chol, compute_dtype=compute_dtype)
    a2, b2 = dec.factors(rank=r)
    log.debug("zs_correct: rank %d, coef %.4g", r, coef)
    return ZSCorrection(a2.to(a.dtype), b2.to(b.dtype), coef)
