"""Zero-sum allocation (ZS-SVD, arXiv 2602.02848; reference code mint-vu/Zero-Sum-SVD).

Scores: in the whitened SVD ``W S = U Σ Vᵀ`` (``S Sᵀ = C_x``) the first-order loss
change of removing component ``i`` is ``δ_i = −σ_i u_iᵀ H v_i`` with ``H = G S⁻ᵀ``,
``G = ∂L/∂W``. Allocation: every matrix offers its smallest remaining component;
the candidates sit in two heaps (``δ >= 0`` and ``δ < 0``, each popping the
smallest ``|δ|``); while the running sum of removed ``δ`` is ``<= 0`` the positive
heap is popped, otherwise the negative one, so the predicted loss change stays
near zero; removal stops as soon as the budget is met. The scores come from
:mod:`obdk.scores`; ZS-SVD's correction step lives in :mod:`obdk.correct`.
"""
from __future__ import annotations

import heapq
import logging
import math
from typing import Any, Optional, Sequence

import torch

from ..errors import ConfigError
from .budget import Allocation, MatrixSpec, _check_specs, budget, max_factored_rank, total_params

log = logging.getLogger(__name__)

__all__ = ["allocate_zero_sum"]


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
        raise ConfigError(f"allocate_zero_sum needs deltas for every matrix; missing for {missing[:5]}")
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
        raise ConfigError(f"infeasible budget: the minimum ranks alone cost {floor_params} params > budget {B:.0f}; "
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
    if P > B:  # feasible by construction (the minimum ranks fit): a bug, not a user error
        raise RuntimeError(f"allocate_zero_sum: internal error, {P} params left over the budget {B}")
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




def spec_fields(deltas, config, costs) -> dict:
    """A target's :class:`MatrixSpec` fields from its zero-sum scores ``deltas`` [k] (δ per component)."""
    return {"deltas": deltas}


def from_config(specs: Sequence[MatrixSpec], config) -> Allocation:
    """:func:`allocate_zero_sum` at ``config.keep`` (its entry in :data:`obdk.registry.ALLOCATORS`)."""
    return allocate_zero_sum(specs, config.keep)
