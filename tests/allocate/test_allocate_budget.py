"""Budget helpers, uniform and global allocation (optimality against brute force)."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from obdk.allocate import (
    MatrixSpec,
    allocate_global,
    allocate_uniform,
    break_even,
    budget,
    max_factored_rank,
    params,
    round_rank,
)
from obdk.allocate.knapsack import floor_rank, suffix_sums


def _spec(name, m, n, gen, *, scale=1.0, decay=1.0):
    k = min(m, n)
    c = (torch.rand(k, generator=gen, dtype=torch.float64) * scale) * torch.exp(
        -decay * torch.arange(k, dtype=torch.float64) * torch.rand(1, generator=gen, dtype=torch.float64))
    c = torch.sort(c, descending=True).values
    return MatrixSpec(name, m, n, costs=c)


# --------------------------------------------------------------------------- budget helpers


def test_params_and_break_even():
    assert params(4, 6, None) == 24
    assert params(4, 6, 2) == 20
    assert break_even(4, 6) == pytest.approx(2.4)
    assert max_factored_rank(4, 6) == 2          # 2·10 = 20 < 24, 3·10 = 30 >= 24
    assert max_factored_rank(4, 4) == 1          # r* = 2 exactly: rank 2 does not save
    assert max_factored_rank(64, 64, 8) == 24    # r* = 32 -> largest multiple of 8 strictly below
    assert max_factored_rank(3, 3, 8) == 0
    for m, n in [(5, 7), (64, 160), (160, 64), (8, 8)]:
        r = max_factored_rank(m, n)
        assert params(m, n, r) < m * n <= params(m, n, r + 1)
    with pytest.raises(ValueError):
        params(4, 4, -1)


def test_round_rank():
    assert round_rank(11.9, 8) == 8
    assert round_rank(12.0, 8) == 16
    assert round_rank(0.2, 8) == 8
    assert round_rank(3.49) == 3
    assert round_rank(-5.0, 4) == 4


def test_budget_and_spec_validation():
    s = [MatrixSpec("a", 4, 6), MatrixSpec("b", 8, 8)]
    assert budget(s, 0.5) == pytest.approx(0.5 * (24 + 64))
    with pytest.raises(ValueError):
        budget(s, 0.0)
    with pytest.raises(ValueError):
        MatrixSpec("c", 4, 4, costs=torch.tensor([1.0, 2.0]))       # increasing
    with pytest.raises(ValueError):
        MatrixSpec("c", 4, 4, costs=torch.ones(5))                  # longer than min(m, n)
    assert MatrixSpec("c", 4, 4, costs=[3.0, 1.0]).tail_loss(1) == 1.0


def test_suffix_sums():
    out = suffix_sums(torch.tensor([3.0, 2.0, 1.0]), 5)
    assert out.tolist() == [6.0, 3.0, 1.0, 0.0, 0.0, 0.0]


# --------------------------------------------------------------------------- uniform


@pytest.mark.parametrize("multiple", [1, 4, 8])
@pytest.mark.parametrize("keep", [0.2, 0.5, 0.8, 1.0])
def test_uniform_matches_formula(keep, multiple):
    shapes = [(64, 64), (160, 64), (64, 160), (16, 128)]
    specs = [MatrixSpec(f"m{i}", m, n, costs=torch.linspace(1, 0, min(m, n))) for i, (m, n) in enumerate(shapes)]
    a = allocate_uniform(specs, keep, multiple=multiple)
    for s in specs:
        r = a.ranks[s.name]
        exact = keep * s.m * s.n / (s.m + s.n)
        if keep >= 1:
            assert r is None
            continue
        want = max(1, math.floor(exact / multiple + 0.5)) * multiple
        if want * (s.m + s.n) >= s.m * s.n:
            assert r is None
        else:
            assert r == want
            if exact >= multiple / 2:     # below that, one multiple is the minimum
                assert abs(r - exact) <= multiple / 2 + 1e-9
    assert a.params == sum(params(s.m, s.n, a.ranks[s.name]) for s in specs)
    assert a.total_params == sum(s.m * s.n for s in specs)
    assert a.predicted_loss == pytest.approx(sum(s.tail_loss(a.ranks[s.name]) for s in specs))
    if multiple == 1 and keep < 1:
        # rounding to the nearest rank: within half a rank per matrix of the budget
        assert abs(a.params - a.budget) <= sum(0.5 * (s.m + s.n) for s in specs) + 1e-9


# --------------------------------------------------------------------------- global vs brute force


def _brute(specs, keep, floor, multiple):
    """Minimum predicted loss over *every* rank 1..min(m, n) (multiples, >= floor) and dense."""
    B = budget(specs, keep)
    per = []
    for s in specs:
        lo = max(1, math.ceil(floor * keep * s.m * s.n / (s.m + s.n) / multiple - 1e-9)) * multiple
        opts = [(s.m * s.n, 0.0, None)]
        for r in range(lo, s.full_rank + 1, multiple):
            opts.append((r * (s.m + s.n), float(s.costs[r:].sum()), r))
        per.append(opts)
    best = None
    for combo in itertools.product(*per):
        p = sum(o[0] for o in combo)
        if p <= B:
            l = sum(o[1] for o in combo)
            if best is None or l < best[0] - 1e-12:
                best = (l, combo)
    return best


def _check_valid(a, specs, keep, floor, multiple):
    assert a.params <= a.budget + 1e-9
    assert a.params == sum(params(s.m, s.n, a.ranks[s.name]) for s in specs)
    for s in specs:
        r = a.ranks[s.name]
        if r is not None:
            assert r % multiple == 0
            assert r * (s.m + s.n) < s.m * s.n, "rank at/above break-even chosen"
            assert r >= floor_rank(s.m, s.n, keep, floor, multiple)
            assert r >= floor * keep * s.m * s.n / (s.m + s.n) - 1e-9
    assert a.predicted_loss == pytest.approx(sum(s.tail_loss(a.ranks[s.name]) for s in specs), abs=1e-12)


CASES = [(seed, nmat, multiple, floor)
         for seed in range(6) for nmat in (2, 3) for multiple in (1, 2) for floor in (0.0, 0.5)]


@pytest.mark.parametrize("seed,nmat,multiple,floor", CASES)
def test_global_optimal_vs_brute_force(seed, nmat, multiple, floor):
    gen = torch.Generator().manual_seed(1000 * seed + 10 * nmat + multiple)
    dims = torch.randint(3, 11, (nmat, 2), generator=gen).tolist()
    specs = [_spec(f"w{i}", m, n, gen, scale=float(10 ** torch.randint(-1, 2, (1,), generator=gen)),
                   decay=float(torch.rand(1, generator=gen)) * 2) for i, (m, n) in enumerate(dims)]
    for keep in (0.3, 0.55, 0.8, 0.95):
        try:
            want = _brute(specs, keep, floor, multiple)
        except Exception:  # pragma: no cover
            raise
        if want is None:
            with pytest.raises(ValueError):
                allocate_global(specs, keep, floor=floor, multiple=multiple)
            continue
        exact = allocate_global(specs, keep, floor=floor, multiple=multiple, method="dp")
        _check_valid(exact, specs, keep, floor, multiple)
        assert exact.predicted_loss == pytest.approx(want[0], rel=1e-9, abs=1e-12)
        assert exact.meta["optimal"]
        lag = allocate_global(specs, keep, floor=floor, multiple=multiple, method="lagrange")
        _check_valid(lag, specs, keep, floor, multiple)
        # certified: LB <= OPT <= loss = LB + gap, and the gap is at most the critical edge's saving
        assert lag.meta["lower_bound"] <= want[0] + 1e-9
        assert lag.predicted_loss >= want[0] - 1e-9
        assert lag.predicted_loss - lag.meta["gap"] == pytest.approx(lag.meta["lower_bound"], abs=1e-9)
        if lag.meta["critical"] is not None:
            assert lag.predicted_loss - want[0] <= lag.meta["critical"]["loss_saved"] + 1e-9


def test_global_lagrange_mostly_exact():
    hits = total = 0
    for seed in range(40):
        gen = torch.Generator().manual_seed(seed)
        specs = [_spec(f"w{i}", int(torch.randint(4, 10, (1,), generator=gen)),
                       int(torch.randint(4, 10, (1,), generator=gen)), gen) for i in range(3)]
        for keep in (0.4, 0.7):
            want = _brute(specs, keep, 0.0, 1)
            lag = allocate_global(specs, keep, floor=0.0, multiple=1, method="lagrange")
            total += 1
            hits += lag.predicted_loss <= want[0] + 1e-9
    assert hits / total >= 0.8, (hits, total)


def test_global_dense_optimal_for_one_matrix():
    # A: flat, large spectrum (every component matters); B: fast decay. keep 0.75 -> budget 96.
    a = MatrixSpec("A", 8, 8, costs=torch.full((8,), 100.0))
    b = MatrixSpec("B", 8, 8, costs=torch.tensor([50.0, 20, 1, 0.5, 0.1, 0.05, 0.01, 0.0]))
    for method in ("dp", "lagrange"):
        alloc = allocate_global([a, b], 0.75, floor=0.0, multiple=1, method=method)
        assert alloc.ranks == {"A": None, "B": 2}, (method, alloc.ranks)
        assert alloc.params == 96
        assert alloc.predicted_loss == pytest.approx(1.66)
    # the brute force agrees
    assert _brute([a, b], 0.75, 0.0, 1)[0] == pytest.approx(1.66)


def test_global_keep_one_is_all_dense():
    specs = [MatrixSpec("a", 6, 9, costs=torch.linspace(2, 1, 6)), MatrixSpec("b", 5, 5, costs=torch.ones(5))]
    alloc = allocate_global(specs, 1.0, floor=0.5, multiple=1)
    assert alloc.ranks == {"a": None, "b": None} and alloc.predicted_loss == 0.0


@pytest.mark.parametrize("method", ["dp", "lagrange"])
@pytest.mark.parametrize("multiple", [1, 2, 8])
def test_global_budget_tight(method, multiple):
    gen = torch.Generator().manual_seed(7)
    shapes = [(64, 64), (64, 64), (64, 160), (160, 64), (32, 64), (64, 32)]
    specs = [_spec(f"w{i}", m, n, gen, decay=0.05) for i, (m, n) in enumerate(shapes)]
    for keep in (0.3, 0.45, 0.7):
        alloc = allocate_global(specs, keep, floor=0.5, multiple=multiple, method=method)
        _check_valid(alloc, specs, keep, 0.5, multiple)
        # costs are strictly positive, so an optimum (and the repaired greedy) leaves less than
        # the largest single step (one multiple of one module, or a jump to dense) unused
        steps = [multiple * (s.m + s.n) for s in specs]
        assert alloc.budget - alloc.params < max(steps)
        assert alloc.budget - alloc.params <= sum(steps)


def test_global_floor_binds():
    # One matrix with negligible costs would be cut to the bone without a floor.
    gen = torch.Generator().manual_seed(3)
    specs = [MatrixSpec("tiny", 64, 64, costs=torch.full((64,), 1e-9)), _spec("big", 64, 64, gen, scale=10.0, decay=0.0)]
    no_floor = allocate_global(specs, 0.5, floor=0.0, multiple=8)
    with_floor = allocate_global(specs, 0.5, floor=0.5, multiple=8)
    assert no_floor.ranks["tiny"] == 8
    assert with_floor.ranks["tiny"] == with_floor.meta["floor_ranks"]["tiny"] == 8 * math.ceil(0.5 * 0.5 * 32 / 8)
    assert with_floor.predicted_loss >= no_floor.predicted_loss - 1e-12


def test_global_infeasible_floor_raises():
    specs = [MatrixSpec("a", 8, 8, costs=torch.ones(8))]
    with pytest.raises(ValueError, match="infeasible"):
        allocate_global(specs, 0.1, floor=0.0, multiple=2)   # one multiple = 32 params > 6.4


def test_global_requires_costs():
    with pytest.raises(ValueError, match="costs"):
        allocate_global([MatrixSpec("a", 8, 8)], 0.5)


def test_global_large_problem_uses_lagrange_quickly():
    gen = torch.Generator().manual_seed(11)
    shapes = [(512, 512)] * 4 + [(512, 1376), (1376, 512)] * 2
    specs = [_spec(f"L{i}", m, n, gen, decay=0.01) for i, (m, n) in enumerate(shapes * 8)]
    alloc = allocate_global(specs, 0.4, floor=0.5, multiple=1, dp_limit=10_000)
    assert alloc.meta["method"] == "lagrange"
    assert alloc.params <= alloc.budget
    assert alloc.meta["gap"] <= 1e-3 * alloc.predicted_loss
