"""BSI: the Hutchinson Hessian-diagonal estimator, importance, and allocation with kept index sets."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from obdk.allocate import MatrixSpec, allocate_bsi, bsi_importance, hutchinson_diag, max_factored_rank
from obdk.allocate.knapsack import floor_rank

F64 = torch.float64


def _sym(n, gen, offdiag=1.0):
    a = torch.randn(n, n, generator=gen, dtype=F64)
    h = offdiag * (a + a.T) / 2
    h.diagonal().copy_(torch.rand(n, generator=gen, dtype=F64) * 4 + 1)
    return h


def test_hutchinson_unbiased_on_quadratic():
    gen = torch.Generator().manual_seed(0)
    n, probes = 20, 400
    h = _sym(n, gen)
    b = torch.randn(n, generator=gen, dtype=F64)
    sigma = torch.rand(n, generator=gen, dtype=F64)
    calls = []

    def grad_fn(s):
        calls.append(1)
        return h @ s + b

    mean, var = hutchinson_diag(grad_fn, sigma, probes=probes, eps=1e-2, generator=torch.Generator().manual_seed(1))
    assert len(calls) == 2 * probes
    se = var.sqrt()
    assert (var > 0).all()
    assert ((mean - h.diagonal()).abs() <= 4 * se).all(), ((mean - h.diagonal()) / se)
    # the reported variance (of the mean) matches the estimator's: Var[z_i (Hz)_i] = Σ_{j≠i} H_ij²
    want = ((h ** 2).sum(1) - h.diagonal() ** 2) / probes
    ratio = float((var / want).mean())
    assert 0.8 < ratio < 1.25, ratio


def test_hutchinson_exact_without_off_diagonal_and_dict_input():
    gen = torch.Generator().manual_seed(2)
    d1, d2 = torch.rand(5, generator=gen, dtype=F64) + 1, torch.rand(3, generator=gen, dtype=F64) + 1
    sig = {"a": torch.rand(5, generator=gen, dtype=F64), "b": torch.rand(3, generator=gen, dtype=F64)}
    mean, var = hutchinson_diag(lambda s: {"a": d1 * s["a"], "b": d2 * s["b"]}, sig, probes=3)
    torch.testing.assert_close(mean["a"], d1)
    torch.testing.assert_close(mean["b"], d2)
    assert float(var["a"].abs().max()) < 1e-18 and var["b"].shape == (3,)
    # a coupled dict problem: cross terms average out
    h = _sym(8, gen)
    flat = lambda s: torch.cat([s["a"], s["b"]])  # noqa: E731
    fn = lambda s: dict(zip(("a", "b"), torch.split(h @ flat(s), [5, 3])))  # noqa: E731
    mean, var = hutchinson_diag(fn, sig, probes=300, generator=torch.Generator().manual_seed(3))
    err = flat(mean) - h.diagonal()
    assert (err.abs() <= 4 * flat(var).sqrt()).all()


def test_hutchinson_second_order_accurate_off_quadratic():
    sigma = torch.linspace(-1, 1, 7, dtype=F64)
    mean, _ = hutchinson_diag(lambda s: torch.sinh(s), sigma, probes=2, eps=1e-3)  # L = Σ cosh σ
    torch.testing.assert_close(mean, torch.cosh(sigma), rtol=1e-6, atol=1e-6)
    _, var1 = hutchinson_diag(lambda s: s, sigma, probes=1)
    assert torch.isnan(var1).all()


def test_bsi_importance_exact_on_separable_quadratic():
    gen = torch.Generator().manual_seed(4)
    a = torch.rand(6, generator=gen, dtype=F64) + 0.5
    b = torch.randn(6, generator=gen, dtype=F64)
    sigma = torch.rand(6, generator=gen, dtype=F64) * 2
    loss = lambda s: float((0.5 * a * s * s + b * s).sum())  # noqa: E731
    imp = bsi_importance(sigma, a * sigma + b, a)
    for i in range(6):
        s2 = sigma.clone()
        s2[i] = 0
        assert imp[i] == pytest.approx(loss(s2) - loss(sigma), rel=1e-12)


# --------------------------------------------------------------------------- allocation


def _brute_bsi(specs, keep, floor, multiple):
    B = keep * sum(s.m * s.n for s in specs)
    per = []
    for s in specs:
        k = s.full_rank
        imp = torch.zeros(k, dtype=F64)
        imp[: s.importance.numel()] = s.importance
        lo = floor_rank(s.m, s.n, keep, floor, multiple)
        opts = [(s.m * s.n, 0.0)]
        for r in range(lo, k + 1, multiple):
            if r * (s.m + s.n) >= s.m * s.n:
                continue
            for kept in itertools.combinations(range(k), r):
                removed = [i for i in range(k) if i not in kept]
                opts.append((r * (s.m + s.n), float(imp[removed].sum())))
        per.append(opts)
    best = None
    for combo in itertools.product(*per):
        if sum(o[0] for o in combo) <= B:
            l = sum(o[1] for o in combo)
            best = l if best is None else min(best, l)
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("multiple,floor", [(1, 0.0), (2, 0.0), (1, 0.5)])
def test_allocate_bsi_optimal_vs_brute_force(seed, multiple, floor):
    gen = torch.Generator().manual_seed(seed)
    specs = []
    for i in range(2 + seed % 2):
        m, n = (int(x) for x in torch.randint(4, 8, (2,), generator=gen))
        k = min(m, n)
        imp = torch.randn(k, generator=gen, dtype=F64).abs() * torch.rand(k, generator=gen, dtype=F64) * 5
        imp[int(torch.randint(0, k, (1,), generator=gen))] *= -0.3      # some harmful bases
        specs.append(MatrixSpec(f"w{i}", m, n, importance=imp))
    for keep in (0.35, 0.6, 0.9):
        want = _brute_bsi(specs, keep, floor, multiple)
        if want is None:
            with pytest.raises(ValueError):
                allocate_bsi(specs, keep, multiple, floor=floor)
            continue
        alloc = allocate_bsi(specs, keep, multiple, floor=floor)
        assert alloc.predicted_loss == pytest.approx(want, abs=1e-12, rel=1e-9)
        assert alloc.params <= alloc.budget
        for s in specs:
            kept = alloc.meta["kept_indices"][s.name]
            r = alloc.ranks[s.name]
            assert torch.equal(kept, torch.sort(kept).values)
            if r is None:
                assert kept.tolist() == list(range(s.full_rank))
                continue
            assert len(kept) == r and r % multiple == 0 and r <= max_factored_rank(s.m, s.n)
            # kept = the r most important
            removed = [i for i in range(s.full_rank) if i not in set(kept.tolist())]
            if removed:
                assert float(s.importance[kept].min()) >= float(s.importance[removed].max()) - 1e-12


def test_allocate_bsi_non_spectral_order_and_harmful_bases():
    # importance is not monotone in the index: the kept set is {0, 2, 5}; index 4 is harmful
    imp = torch.tensor([5.0, 0.1, 3.0, 0.2, -1.0, 4.0, 0.05, 0.01])
    alloc = allocate_bsi([MatrixSpec("w", 16, 16, importance=imp)], 3 * 32 / 256, 1)
    assert alloc.ranks == {"w": 3}
    assert alloc.meta["kept_indices"]["w"].tolist() == [0, 2, 5]
    assert alloc.predicted_loss == pytest.approx(0.1 + 0.2 - 1.0 + 0.05 + 0.01)
    assert math.isclose(alloc.params, 96)


def test_allocate_bsi_spectral_order_keeps_top_components():
    """order='spectral': the same importances, but a matrix keeps its top-r components; the loss is the tail sum."""
    imp = torch.tensor([5.0, 0.1, 3.0, 0.2, -1.0, 4.0, 0.05, 0.01])
    alloc = allocate_bsi([MatrixSpec("w", 16, 16, importance=imp)], 3 * 32 / 256, 1, order="spectral")
    assert alloc.ranks == {"w": 3}
    assert alloc.meta["kept_indices"]["w"].tolist() == [0, 1, 2]
    assert alloc.predicted_loss == pytest.approx(float(imp[3:].sum()))
    # across matrices the budget goes where the tail costs more
    a = MatrixSpec("a", 16, 16, importance=torch.tensor([9.0, 8.0, 7.0, 6.0] + [0.0] * 12))
    b = MatrixSpec("b", 16, 16, importance=torch.tensor([1.0, 0.5, 0.1, 0.0] + [0.0] * 12))
    alloc = allocate_bsi([a, b], 4 * 32 / 512, 1, order="spectral")
    assert alloc.ranks == {"a": 3, "b": 1}  # rank ≥ 1 each; a's tail is the expensive one
    assert alloc.predicted_loss == pytest.approx(6.0 + 0.6)
    with pytest.raises(ValueError, match="order"):
        allocate_bsi([a], 0.5, 1, order="random")
