"""Whitened SVD, ZS-SVD scores, the two-heap zero-sum allocation and the correction step."""
from __future__ import annotations

import math

import pytest
import torch

from obdk.allocate import (
    MatrixSpec,
    allocate_zero_sum,
    gradient_step,
    max_factored_rank,
    params,
    whitened_svd,
    zero_sum_scores,
    zs_correct,
)
from obdk.decompose import kfac_loss
from obdk.decompose.roots import cholesky_root

F64 = torch.float64


def _gram(n, gen, rank=None, tokens=64):
    x = torch.randn(tokens, rank or n, generator=gen, dtype=F64)
    if rank is not None:
        x = x @ torch.randn(rank, n, generator=gen, dtype=F64)
    return x.T @ x / tokens


# --------------------------------------------------------------------------- whitened SVD


@pytest.mark.parametrize("m,n", [(7, 5), (5, 7), (6, 6)])
def test_whitened_svd_reconstructs(m, n):
    gen = torch.Generator().manual_seed(m * 10 + n)
    w = torch.randn(m, n, generator=gen, dtype=F64)
    cx = _gram(n, gen)
    dec = whitened_svd(w, cx, damping=0.0)
    s = dec.chol
    assert dec.damping == 0.0
    torch.testing.assert_close(s @ s.T, cx)
    assert torch.equal(s, torch.tril(s))
    torch.testing.assert_close(dec.weight(), w, rtol=1e-10, atol=1e-10)
    a, b = dec.factors()
    torch.testing.assert_close(b @ a, w, rtol=1e-10, atol=1e-10)
    # truncation is the best rank-r approximation in the whitened norm ||(W - W') S||_F
    r = 2
    a, b = dec.factors(rank=r)
    err = torch.linalg.norm((w - b @ a) @ s)
    assert err == pytest.approx(float(torch.linalg.norm(dec.sigma[r:])), rel=1e-10)
    # arbitrary kept indices
    a, b = dec.factors(indices=[0, 2])
    torch.testing.assert_close(b @ a, dec.weight(indices=torch.tensor([0, 2])))


def damped_cholesky(c, damping):
    return cholesky_root(c, damping, name="C_x")


def test_damped_cholesky_escalates_on_singular_gram():
    gen = torch.Generator().manual_seed(0)
    c = _gram(6, gen, rank=2)
    s, alpha = damped_cholesky(c, 0.0)
    assert alpha > 0
    torch.testing.assert_close(s @ s.T, c + alpha * c.diagonal().mean() * torch.eye(6, dtype=F64))
    s1, a1 = damped_cholesky(c, 0.01)
    assert a1 == 0.01


# --------------------------------------------------------------------------- ZS scores


def test_zero_sum_delta_exact_for_linear_loss():
    gen = torch.Generator().manual_seed(1)
    m, n = 6, 5
    w = torch.randn(m, n, generator=gen, dtype=F64)
    q = torch.randn(m, n, generator=gen, dtype=F64)  # L(W) = <Q, W>, G = Q
    sc = zero_sum_scores(w, q, _gram(n, gen), damping=0.01)
    loss = lambda x: float((q * x).sum())  # noqa: E731
    for i in range(min(m, n)):
        keep = [j for j in range(min(m, n)) if j != i]
        assert sc.delta[i] == pytest.approx(loss(sc.weight(indices=keep)) - loss(w), rel=1e-9, abs=1e-12)
    # H = G S^-T by triangular solve agrees with the explicit inverse
    h = q @ torch.linalg.inv(sc.chol).T
    torch.testing.assert_close(sc.grad_sigma, torch.diagonal(sc.u.T @ h @ sc.v), rtol=1e-9, atol=1e-12)


def test_zero_sum_delta_matches_finite_difference():
    gen = torch.Generator().manual_seed(2)
    m, n, t = 5, 4, 32
    x = torch.randn(t, n, generator=gen, dtype=F64)
    y = torch.randn(t, m, generator=gen, dtype=F64)
    w0 = torch.randn(m, n, generator=gen, dtype=F64)

    def loss(w):  # a smooth non-quadratic loss
        return torch.nn.functional.softplus((x @ w.T) * y).sum() + 0.1 * (w ** 2).sum() ** 2

    w = w0.clone().requires_grad_(True)
    g, = torch.autograd.grad(loss(w), w)
    sc = zero_sum_scores(w0, g, x.T @ x / t, damping=1e-3)
    a, b = sc.factors()
    h = 1e-6
    for i in range(min(m, n)):
        comp = torch.outer(b[:, i], a[i])          # σ_i u_i x_iᵀ
        fd = (loss(w0 - h * comp) - loss(w0 + h * comp)) / (2 * h)
        assert sc.delta[i] == pytest.approx(float(fd), rel=1e-6, abs=1e-9)
    # on a quadratic the full removal is first order + the exact curvature term
    c = torch.randn(n, n, generator=gen, dtype=F64)
    c = c @ c.T
    quad = lambda w_: 0.5 * torch.trace((w_ - w0 * 0.5) @ c @ (w_ - w0 * 0.5).T)  # noqa: E731
    gq = (w0 - w0 * 0.5) @ c
    sq = zero_sum_scores(w0, gq, None)
    for i in range(min(m, n)):
        comp = sq.sigma[i] * torch.outer(sq.u[:, i], sq.v[:, i])
        exact = quad(w0 - comp) - quad(w0)
        curv = 0.5 * torch.trace(comp @ c @ comp.T)
        assert float(sq.delta[i] + curv) == pytest.approx(float(exact), rel=1e-9, abs=1e-12)


# --------------------------------------------------------------------------- allocation


def _zs_specs(seed, shapes):
    gen = torch.Generator().manual_seed(seed)
    specs = []
    for i, (m, n) in enumerate(shapes):
        k = min(m, n)
        sig = torch.sort(torch.rand(k, generator=gen, dtype=F64) * 3, descending=True).values
        d = -sig * torch.randn(k, generator=gen, dtype=F64)
        specs.append(MatrixSpec(f"w{i}", m, n, deltas=d))
    return specs


def _zs_price(s, r):
    return s.m * s.n if r > max_factored_rank(s.m, s.n) else r * (s.m + s.n)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("keep", [0.3, 0.6, 0.9])
@pytest.mark.parametrize("ratio", [0.0, 0.3])
def test_zero_sum_invariants(seed, keep, ratio):
    specs = _zs_specs(seed, [(16, 16), (16, 40), (40, 16), (8, 24)])
    lo = {s.name: max(1, math.ceil(ratio * max_factored_rank(s.m, s.n) - 1e-9)) for s in specs}
    if sum(lo[s.name] * (s.m + s.n) for s in specs) > keep * sum(s.m * s.n for s in specs):
        with pytest.raises(ValueError, match="infeasible"):
            allocate_zero_sum(specs, keep, min_rank_ratio=ratio)
        return
    alloc = allocate_zero_sum(specs, keep, min_rank_ratio=ratio, record_trace=True)
    by = {s.name: s for s in specs}
    rank = {s.name: s.full_rank for s in specs}
    assert alloc.meta["min_ranks"] == lo
    running = 0.0
    total = sum(s.m * s.n for s in specs)
    for step in alloc.meta["trace"]:
        assert total > alloc.budget, "kept removing after the budget was met"
        tails = {nm: float(by[nm].deltas[r - 1]) for nm, r in rank.items() if r > lo[nm]}
        pos = {nm: d for nm, d in tails.items() if d >= 0}
        neg = {nm: d for nm, d in tails.items() if d < 0}
        assert step["running_before"] == pytest.approx(running)
        assert step["pos_available"] == bool(pos) and step["neg_available"] == bool(neg)
        # spectral order: the removed component is the matrix's current tail
        assert step["index"] == rank[step["name"]] - 1
        # sign rule: positive heap while the running sum is <= 0, negative otherwise
        heap = pos if running <= 0 else neg
        if not heap:
            heap = neg if running <= 0 else pos
        assert step["name"] in heap
        assert abs(step["delta"]) == pytest.approx(min(abs(d) for d in heap.values()))
        nm = step["name"]
        total += _zs_price(by[nm], rank[nm] - 1) - _zs_price(by[nm], rank[nm])
        rank[nm] -= 1
        running += step["delta"]
    assert alloc.meta["running_sum"] == pytest.approx(running)
    assert total <= alloc.budget
    assert alloc.params <= alloc.budget
    for s in specs:
        r = alloc.ranks[s.name]
        if rank[s.name] > max_factored_rank(s.m, s.n):
            assert r is None
        else:
            assert r == rank[s.name] >= lo[s.name]
            assert params(s.m, s.n, r) < s.m * s.n
    assert alloc.params == sum(params(s.m, s.n, alloc.ranks[s.name]) for s in specs)
    want = sum(float(s.deltas[alloc.ranks[s.name]:].sum()) for s in specs if alloc.ranks[s.name] is not None)
    assert alloc.predicted_loss == pytest.approx(want)


def test_zero_sum_restores_matrix_that_never_crossed_break_even():
    # A offers one tiny positive delta, then big ones; B offers small positives: A loses one
    # component, B crosses break-even and meets the budget, A goes back to dense.
    a = MatrixSpec("A", 8, 8, deltas=torch.tensor([10.0] * 7 + [0.001]))
    b = MatrixSpec("B", 8, 8, deltas=torch.full((8,), 0.01))
    alloc = allocate_zero_sum([a, b], 0.75)
    assert alloc.ranks == {"A": None, "B": 2}
    assert alloc.params == 96 == alloc.budget
    assert alloc.meta["restored"] == ["A"]
    assert alloc.predicted_loss == pytest.approx(0.06)


# --------------------------------------------------------------------------- correction


def test_zs_correct_dense_step_is_exact_on_isotropic_quadratic():
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(9, 7, generator=gen, dtype=F64)
    dec = whitened_svd(w, None)
    a, b = dec.factors(rank=3)
    g = b @ a - w                        # gradient of ½||W' − W||² at W_r
    out = zs_correct(w, a, b, g)
    assert out.coef == pytest.approx(-1.0)  # the step lands on W, re-truncation returns W_r
    torch.testing.assert_close(out.b @ out.a, b @ a)
    assert out.a.shape == a.shape and out.b.shape == b.shape


@pytest.mark.parametrize("seed", range(5))
def test_zs_correct_reduces_quadratic_loss(seed):
    # True loss: anisotropic quadratic around W* != W; the truncation was made by plain SVD.
    gen = torch.Generator().manual_seed(seed)
    m, n, r = 12, 10, 4
    w = torch.randn(m, n, generator=gen, dtype=F64)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    hx = q @ torch.diag(torch.logspace(-2, 1, n, dtype=F64)) @ q.T
    wstar = w + 0.3 * torch.randn(m, n, generator=gen, dtype=F64)
    loss = lambda x: float(0.5 * torch.trace((x - wstar) @ hx @ (x - wstar).T))  # noqa: E731
    a, b = whitened_svd(w, None).factors(rank=r)
    wr = b @ a
    g = (wr - wstar) @ hx
    out = zs_correct(w, a, b, g)
    assert loss(wr + out.coef * g) < loss(wr)           # the dense step
    assert loss(out.b @ out.a) < loss(wr)               # and after re-truncation to rank r
    assert torch.linalg.matrix_rank(out.b @ out.a) == r
    # whitened re-truncation: same rank, in the given coordinates
    s = torch.linalg.cholesky(hx)
    a2, b2 = whitened_svd(w, chol=s).factors(rank=r)
    out2 = zs_correct(w, a2, b2, (b2 @ a2 - wstar) @ hx, chol=s)
    assert out2.a.shape == (r, n) and out2.b.shape == (m, r)


def _spd(k, gen, lo=-2.0, hi=1.0):
    q, _ = torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=F64))
    return q @ torch.diag(torch.logspace(lo, hi, k, dtype=F64)) @ q.T


def test_gradient_step_without_factors_is_zs_step():
    gen = torch.Generator().manual_seed(11)
    w, wr, g = (torch.randn(6, 5, generator=gen, dtype=F64) for _ in range(3))
    wc, c = gradient_step(w, wr, g)
    assert c == pytest.approx(float((g * (w - wr)).sum() / (g * g).sum()))
    torch.testing.assert_close(wc, wr + c * g)


@pytest.mark.parametrize("seed", range(3))
def test_gradient_step_kfac_lands_on_w_for_a_kfac_quadratic(seed):
    # L(X) = k/2 tr(Cg (X−W) Cx (X−W)ᵀ): G = k·Cg (Wr − W) Cx; the natural step recovers W exactly
    gen = torch.Generator().manual_seed(seed)
    m, n, k = 7, 9, 123.0
    cx, cg = _spd(n, gen), _spd(m, gen)
    w = torch.randn(m, n, generator=gen, dtype=F64)
    wr = w + 0.5 * torch.randn(m, n, generator=gen, dtype=F64)
    g = k * cg @ (wr - w) @ cx
    lx, lg = torch.linalg.cholesky(cx), torch.linalg.cholesky(cg)
    wc, c = gradient_step(w, wr, g, chol_x=lx, chol_g=lg)
    assert c == pytest.approx(-1.0 / k)
    torch.testing.assert_close(wc, w, rtol=1e-9, atol=1e-9)
    # the factors' scale does not matter (the pipeline uses normalised covariances)
    wc2, _ = gradient_step(w, wr, g, chol_x=lx * 3.0, chol_g=lg * 0.1)
    torch.testing.assert_close(wc2, wc, rtol=1e-9, atol=1e-9)
    # the Euclidean (ZS) step does not, on the same problem
    wz, _ = gradient_step(w, wr, g)
    assert float((wz - w).norm()) > 1e-3


def test_gradient_step_kfac_coefficient_minimises_the_kfac_distance():
    gen = torch.Generator().manual_seed(4)
    m, n = 8, 6
    cx, cg = _spd(n, gen), _spd(m, gen)
    w, wr, g = (torch.randn(m, n, generator=gen, dtype=F64) for _ in range(3))  # g: any gradient
    wc, c = gradient_step(w, wr, g, chol_x=torch.linalg.cholesky(cx), chol_g=torch.linalg.cholesky(cg))
    p = (wc - wr) / c
    torch.testing.assert_close(cg @ p @ cx, g)  # P = Cg⁻¹ G Cx⁻¹
    dist = lambda t: kfac_loss(wr + t * p - w, cx, cg)  # noqa: E731
    assert dist(c) <= min(dist(c * 1.01), dist(c * 0.99), dist(0.0))
