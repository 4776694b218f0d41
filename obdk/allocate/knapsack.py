"""Global allocation: minimise the summed predicted loss under the parameter budget.

Each matrix ``j`` offers a short list of *options*: factorised ranks (multiples of
``multiple``, at least its floor, below break-even) and "dense". Option ``o``
costs ``p_jo`` parameters and predicts loss ``ℓ_jo``; exactly one option per
matrix is chosen and ``Σ p ≤ B``. That is a multiple-choice knapsack problem
(MCKP); :func:`solve_choices` solves it for any option lists, and
:func:`allocate_global` builds the option lists from OBD costs (``λ_i/2``).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..errors import ConfigError
from .budget import Allocation, MatrixSpec, _check_specs, budget, max_factored_rank, total_params, uniform_rank

log = logging.getLogger(__name__)

__all__ = ["Choices", "solve_choices", "allocate_global", "suffix_sums", "floor_rank", "rank_choices"]

#: default cap on ``capacity × Σ options`` for the exact dynamic programme (``method="auto"``)
DP_LIMIT = 30_000_000


@dataclass
class Choices:
    """The options of one matrix: ``params`` [K] int (strictly increasing), ``loss`` [K] float, ``labels`` [K].

    ``labels[o]`` is what the caller wants back for option ``o`` (a rank, or ``None`` for dense).
    """
    name: str
    params: np.ndarray
    loss: np.ndarray
    labels: list

    def __post_init__(self) -> None:
        self.params = np.asarray(self.params, dtype=np.int64).reshape(-1)
        self.loss = np.asarray(self.loss, dtype=np.float64).reshape(-1)
        if not (len(self.params) == len(self.loss) == len(self.labels)) or len(self.params) == 0:
            raise ConfigError(f"Choices {self.name!r}: params, loss and labels must be non-empty and of equal length")
        if (np.diff(self.params) <= 0).any():
            raise ConfigError(f"Choices {self.name!r}: params must be strictly increasing")
        if not np.isfinite(self.loss).all():
            raise ConfigError(f"Choices {self.name!r}: loss must be finite")


def suffix_sums(costs: torch.Tensor, length: int) -> torch.Tensor:
    """``out[r] = Σ_{i >= r} costs[i]`` for ``r = 0..length`` (fp64, [length+1]); costs past the end count 0."""
    c = torch.zeros(length, dtype=torch.float64)
    k = min(length, costs.numel())
    c[:k] = costs[:k].to(torch.float64)
    out = torch.zeros(length + 1, dtype=torch.float64)
    out[:length] = torch.flip(torch.cumsum(torch.flip(c, (0,)), 0), (0,))
    return out


# --------------------------------------------------------------------------- solver pieces


def _pareto(ch: Choices) -> np.ndarray:
    """Indices of the options not dominated by a cheaper one (strictly lower loss than all cheaper)."""
    keep = [0]
    best = ch.loss[0]
    for o in range(1, len(ch.loss)):
        if ch.loss[o] < best:
            keep.append(o)
            best = ch.loss[o]
    return np.asarray(keep, dtype=np.int64)


def _lower_hull(p: np.ndarray, l: np.ndarray) -> list[int]:
    """Vertices (indices into ``p``) of the lower convex hull of points sorted by ``p``, loss decreasing."""
    h: list[int] = []
    for i in range(len(p)):
        while len(h) >= 2:
            o, a = h[-2], h[-1]
            cross = float(p[a] - p[o]) * float(l[i] - l[o]) - float(l[a] - l[o]) * float(p[i] - p[o])
            if cross <= 0.0:  # a lies on or above the chord o→i: not a hull vertex
                h.pop()
            else:
                break
        h.append(i)
    return h


def _fill(opts: list[Choices], choice: np.ndarray, P: int, B: float) -> tuple[np.ndarray, int]:
    """Repeatedly move one matrix to the option that saves the most loss and still fits ``B``."""
    choice = choice.copy()
    while True:
        left = B - P
        best: Optional[tuple[float, int, int, int]] = None  # (gain, -dp, j, o)
        for j, ch in enumerate(opts):
            c = choice[j]
            if c + 1 >= len(ch.params):
                continue
            dp = ch.params[c + 1:] - ch.params[c]
            ok = np.nonzero(dp <= left)[0]
            if ok.size == 0:
                continue
            gains = ch.loss[c] - ch.loss[c + 1:][ok]
            k = int(np.argmax(gains))
            cand = (float(gains[k]), -int(dp[ok[k]]), j, c + 1 + int(ok[k]))
            if cand[0] > 0 and (best is None or cand[:2] > best[:2]):
                best = cand
        if best is None:
            return choice, P
        _, ndp, j, o = best
        choice[j] = o
        P += -ndp


def _solve_lagrange(opts: list[Choices], B: float) -> tuple[np.ndarray, dict[str, Any]]:
    """Greedy over the lower convex hulls (= the LP relaxation's optimum), then repair; returns a gap bound."""
    J = len(opts)
    hulls = [_lower_hull(ch.params, ch.loss) for ch in opts]
    segs: list[tuple[float, int, int, int, float]] = []  # (ratio, j, k, dp, dl) for hull edge k→k+1 of matrix j
    for j, (ch, h) in enumerate(zip(opts, hulls)):
        prev = math.inf
        for k in range(len(h) - 1):
            dp = int(ch.params[h[k + 1]] - ch.params[h[k]])
            dl = float(ch.loss[h[k]] - ch.loss[h[k + 1]])
            ratio = min(dl / dp, prev)  # clamp float noise so ratios never rise along a chain
            prev = ratio
            segs.append((ratio, j, k, dp, dl))
    segs.sort(key=lambda s: (-s[0], s[1], s[2]))  # chain order is kept within a matrix
    pos = np.zeros(J, dtype=np.int64)  # hull vertex reached per matrix
    P = int(sum(int(ch.params[0]) for ch in opts))
    L = float(sum(float(ch.loss[0]) for ch in opts))
    taken: list[tuple[float, int, int, int, float]] = []
    crit = None
    for s in segs:
        if P + s[3] <= B:
            P += s[3]
            L -= s[4]
            pos[s[1]] = s[2] + 1
            taken.append(s)
        else:
            crit = s
            break
    lower = L - crit[0] * (B - P) if crit is not None else L
    to_opt = lambda pos_: np.array([hulls[j][pos_[j]] for j in range(J)], dtype=np.int64)  # noqa: E731

    cands = []
    choice_a, P_a = _fill(opts, to_opt(pos), P, B)
    cands.append(("greedy+fill", choice_a, P_a))
    if crit is not None:
        # Take the critical edge whole and give back the least efficient edges taken so far.
        pos_b, P_b = pos.copy(), P + crit[3]
        pos_b[crit[1]] = crit[2] + 1
        for s in reversed(taken):
            if P_b <= B:
                break
            if s[1] == crit[1] or pos_b[s[1]] != s[2] + 1:
                continue
            pos_b[s[1]] = s[2]
            P_b -= s[3]
        if P_b <= B:
            choice_b, P_b = _fill(opts, to_opt(pos_b), P_b, B)
            cands.append(("critical+fill", choice_b, P_b))
    losses = [float(sum(opts[j].loss[c[j]] for j in range(J))) for _, c, _ in cands]
    i = int(np.argmin(losses))
    meta = {"method": "lagrange", "lower_bound": lower, "repair": cands[i][0],
            "critical": None if crit is None else {"name": opts[crit[1]].name, "ratio": crit[0],
                                                   "params": crit[3], "loss_saved": crit[4]}}
    return cands[i][1], meta


def _dp_size(opts: list[Choices], B: float) -> tuple[int, int, int]:
    """(gcd unit, capacity in units, work = capacity × Σ options) of the shifted DP."""
    base = sum(int(ch.params[0]) for ch in opts)
    w = np.concatenate([ch.params[1:] - ch.params[0] for ch in opts])
    g = int(np.gcd.reduce(w)) if w.size else 1
    g = g or 1
    cap = int(math.floor(B - base)) // g
    return g, cap, (cap + 1) * sum(len(ch.params) for ch in opts)


def _solve_dp(opts: list[Choices], B: float) -> tuple[np.ndarray, dict[str, Any]]:
    """Exact dynamic programme over the budget in units of the gcd of the option costs."""
    g, cap, work = _dp_size(opts, B)
    f = np.zeros(cap + 1, dtype=np.float64)  # min loss of the matrices so far within c units
    args = []
    for ch in opts:
        w = ((ch.params - ch.params[0]) // g).astype(np.int64)
        new = np.full(cap + 1, np.inf)
        arg = np.zeros(cap + 1, dtype=np.min_scalar_type(len(w)))  # back-pointers: J × (cap+1) small ints
        for o in range(len(w)):
            if w[o] > cap:
                break
            cand = f[: cap + 1 - w[o]] + ch.loss[o]
            tgt = new[w[o]:]
            better = cand < tgt
            tgt[better] = cand[better]
            arg[w[o]:][better] = o
        f = new
        args.append(arg)
    choice = np.zeros(len(opts), dtype=np.int64)
    c = cap
    for j in range(len(opts) - 1, -1, -1):
        o = int(args[j][c])
        choice[j] = o
        c -= int((opts[j].params[o] - opts[j].params[0]) // g)
    return choice, {"method": "dp", "lower_bound": float(f[cap]), "dp_unit": g, "dp_capacity": cap, "dp_work": work}


def solve_choices(opts: Sequence[Choices], budget_params: float, *, method: str = "auto",
                  dp_limit: int = DP_LIMIT) -> tuple[list, dict[str, Any]]:
    """Pick one option per matrix minimising ``Σ loss`` subject to ``Σ params <= budget_params``.

    Returns ``(labels, meta)``: the chosen label per matrix (in input order) and
    ``meta`` with ``method``, ``params``, ``loss``, ``lower_bound`` (a proven lower
    bound on the optimum), ``gap = loss - lower_bound`` and ``optimal``.

    ``method``: ``"dp"`` exact; ``"lagrange"`` convex-hull greedy with repair and a
    certified gap; ``"auto"`` (default) uses ``"dp"`` when its work
    (capacity/gcd × Σ options) is at most ``dp_limit``, else ``"lagrange"``.
    Raises ``ValueError`` when even the cheapest option of every matrix exceeds the budget.
    """
    opts = list(opts)
    if not opts:
        raise ConfigError("solve_choices: no matrices")
    base = sum(int(ch.params[0]) for ch in opts)
    if base > budget_params:
        raise ConfigError(f"infeasible budget: the cheapest option of every matrix already costs {base} params "
                         f"> budget {budget_params:.0f}; lower the floor or the rank multiple, or raise keep")
    pruned = []
    for ch in opts:
        k = _pareto(ch)
        pruned.append(Choices(ch.name, ch.params[k], ch.loss[k], [ch.labels[i] for i in k]))
    if method == "auto":
        method = "dp" if _dp_size(pruned, budget_params)[2] <= dp_limit else "lagrange"
    if method == "dp":
        choice, meta = _solve_dp(pruned, budget_params)
    elif method == "lagrange":
        choice, meta = _solve_lagrange(pruned, budget_params)
    else:
        raise ConfigError(f"solve_choices: method must be 'auto', 'dp' or 'lagrange', got {method!r}")
    used = int(sum(int(pruned[j].params[c]) for j, c in enumerate(choice)))
    loss = float(sum(float(pruned[j].loss[c]) for j, c in enumerate(choice)))
    gap = max(0.0, loss - meta["lower_bound"])
    scale = max(1.0, abs(loss))
    meta.update(params=used, loss=loss, gap=gap, optimal=bool(meta["method"] == "dp" or gap <= 1e-9 * scale))
    if used > budget_params:  # a bug, not a user error: keep the traceback
        raise RuntimeError(f"allocate_global: internal error, {used} params chosen over the budget {budget_params}")
    return [pruned[j].labels[c] for j, c in enumerate(choice)], meta


# --------------------------------------------------------------------------- allocate_global


def floor_rank(m: int, n: int, keep: float, floor: float, multiple: int) -> int:
    """Smallest allowed rank: ``floor × keep·mn/(m+n)`` rounded *up* to ``multiple`` (at least one multiple)."""
    r = floor * uniform_rank(m, n, keep)
    return max(1, math.ceil(r / multiple - 1e-9)) * multiple


def _options(s: MatrixSpec, keep: float, floor: float, multiple: int) -> tuple[Choices, int]:
    lo = floor_rank(s.m, s.n, keep, floor, multiple)
    hi = max_factored_rank(s.m, s.n, multiple)
    return rank_choices(s, suffix_sums(s.costs, s.full_rank), lo, hi, multiple), lo


def rank_choices(s: MatrixSpec, tails: torch.Tensor, lo: int, hi: int, multiple: int) -> Choices:
    """Options ranks ``lo, lo+multiple, …, hi`` (loss ``tails[r]``) and dense (loss 0)."""
    ranks = np.arange(lo, hi + 1, multiple, dtype=np.int64)
    p = np.append(ranks * (s.m + s.n), s.dense_params)
    l = np.append(tails.numpy()[ranks], 0.0)
    return Choices(s.name, p, l, ranks.tolist() + [None])


def allocate_global(specs: Sequence[MatrixSpec], keep: float, *, floor: float = 0.5, multiple: int = 8,
                    method: str = "auto", dp_limit: int = DP_LIMIT) -> Allocation:
    """Ranks minimising the summed predicted loss ``Σ_j Σ_{i >= r_j} costs_j[i]`` under ``Σ params <= keep·Σ mn``.

    Every matrix chooses one option: dense (``m·n`` params, zero loss) or a rank
    ``r`` with ``r ≡ 0 (mod multiple)``, ``r >= floor_j`` and ``r·(m+n) < m·n``
    (a rank at or above break-even is never offered: dense is cheaper and
    lossless). ``floor_j = ceil(floor · keep·mn/(m+n))`` to the multiple
    (``floor=0`` allows one multiple). ``specs[*].costs`` must be given.

    Optimality. This is a multiple-choice knapsack. Because costs are
    non-increasing, each matrix's (params, loss) points over its ranks form a
    convex chain with equal parameter steps; the dense point breaks convexity
    (it is cheap relative to the whole tail it removes). Two solvers:

    * ``"dp"`` — exact: dynamic programme over the budget in units of the gcd
      of all option-cost differences (after shifting each matrix by its cheapest
      option), ``O(capacity × Σ options)``.
    * ``"lagrange"`` — for large problems. Relaxing "one option" to convex
      combinations gives an LP whose optimum, for every Lagrange multiplier,
      lies on each matrix's *lower convex hull* of its points (dense included);
      it is reached by taking hull edges in order of decreasing loss saved per
      parameter until the first edge (the *critical* one) does not fit, and
      taking that edge fractionally. Its value ``LB`` is a lower bound on the
      integer optimum. The integer answer is the best of (a) the whole edges
      taken plus a repair that moves any matrix to any better option (hull or
      not, including ranks the hull skips) that still fits, and (b) the critical
      edge taken whole, the least efficient taken edges given back until
      feasible, then the same repair. Hence ``OPT <= loss <= LB + ratio_crit ×
      leftover <= OPT + loss_saved(critical edge)``: the gap is at most one hull
      edge of one matrix, and ``meta["gap"] = loss - LB`` certifies it.

    ``method="auto"`` picks ``"dp"`` when its work is at most ``dp_limit``.
    ``meta``: ``floor_ranks``, ``lower_bound``, ``gap``, ``optimal``, ``method``, ….
    Raises ``ValueError`` when the floors alone exceed the budget.
    """
    _check_specs(specs)
    if multiple < 1:
        raise ConfigError(f"allocate_global: multiple must be >= 1, got {multiple}")
    if floor < 0:
        raise ConfigError(f"allocate_global: floor must be >= 0, got {floor}")
    missing = [s.name for s in specs if s.costs is None]
    if missing:
        raise ConfigError(f"allocate_global needs costs (λ_i/2) for every matrix; missing for {missing[:5]}")
    B = budget(specs, keep)
    opts, floors = [], {}
    for s in specs:
        ch, lo = _options(s, keep, floor, multiple)
        opts.append(ch)
        floors[s.name] = lo
    labels, meta = solve_choices(opts, B, method=method, dp_limit=dp_limit)
    ranks = {s.name: r for s, r in zip(specs, labels)}
    meta.update(floor=floor, multiple=multiple, floor_ranks=floors)
    log.info("global allocation at keep=%.4f (floor %.2f, multiple %d, %s): %d of %.0f params, predicted loss %.6g, "
             "gap <= %.3g, %d dense", keep, floor, multiple, meta["method"], meta["params"], B, meta["loss"],
             meta["gap"], sum(r is None for r in labels))
    return Allocation(ranks=ranks, params=meta["params"], budget=B, total_params=total_params(specs),
                      predicted_loss=meta["loss"], strategy="global", meta=meta)


def from_config(specs: Sequence[MatrixSpec], config) -> Allocation:
    """:func:`allocate_global` at ``config``'s ``keep``, ``floor`` and ``rank_multiple`` (its entry in
    :data:`obdk.registry.ALLOCATORS`)."""
    return allocate_global(specs, config.keep, floor=config.floor, multiple=config.rank_multiple)
