"""factorize: optimality under the K-FAC loss, solver agreement, method nesting, degenerate covariances."""
from __future__ import annotations

import pytest
import torch

from obdk.decompose import damp_covariance, factorize, kfac_loss
from tests.decompose.decompose_problems import F64, batched_loss, correlated_cov, gen, low_rank_cov, problem

SHAPES = [(24, 40), (40, 24)]  # m < n takes the m×m eigen form, m > n the n×n form


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


# --------------------------------------------------------------------------- optimality


@pytest.mark.parametrize("m,n", SHAPES)
@pytest.mark.parametrize("rank", [3, 9])
def test_obd_loss_is_predicted_and_beats_1000_alternatives(m, n, rank):
    w, cx, cg = problem(m, n, seed=rank)
    f = factorize(w, rank, cx=cx, cg=cg, damping=0.0)
    assert not f.dense and f.b.shape == (m, rank) and f.a.shape == (rank, n)
    assert f.damping == {"cx": 0.0, "cg": 0.0}
    true = kfac_loss(w - f.b @ f.a, cx, cg)
    assert _rel(true, f.predicted_loss) < 1e-6
    assert _rel(f.predicted_loss, 0.5 * float(f.spectrum[rank:].sum())) < 1e-12

    g = gen(100 + rank)
    alts = []
    # 400 random perturbations of the optimal factors, at scales from 1e-6 to 1e-1.
    for eps in torch.logspace(-6, -1, 8, dtype=F64).tolist():
        db = torch.randn(50, m, rank, generator=g, dtype=F64) * f.b.norm() / (m * rank) ** 0.5
        da = torch.randn(50, rank, n, generator=g, dtype=F64) * f.a.norm() / (rank * n) ** 0.5
        alts.append((f.b + eps * db) @ (f.a + eps * da))
    # 300 random input projections W Q Qᵀ.
    q, _ = torch.linalg.qr(torch.randn(300, n, rank, generator=g, dtype=F64))
    alts.append(w @ q @ q.mT)
    # 300 C_g-optimal fits on random column spaces: sketches W Ω and perturbed optimal spaces.
    y = torch.cat([w @ torch.randn(150, n, rank, generator=g, dtype=F64),
                   f.b + 0.05 * f.b.norm() / (m * rank) ** 0.5 * torch.randn(150, m, rank, generator=g, dtype=F64)])
    gram = y.mT @ cg @ y
    alts.append(y @ torch.linalg.solve(gram, y.mT @ cg @ w))
    alts = torch.cat(alts)
    assert alts.shape[0] == 1000
    losses = batched_loss(w - alts, cx, cg)
    assert bool((losses >= true * (1 - 1e-9)).all()), float(losses.min() / true)

    # The two published baselines, measured in the OBD metric, are no better.
    for method in ("svd-llm", "svd"):
        other = factorize(w, rank, method=method, cx=cx, damping=0.0)
        assert kfac_loss(w - other.to_dense(), cx, cg) >= true * (1 - 1e-9)


@pytest.mark.parametrize("m,n", SHAPES)
@pytest.mark.parametrize("method", ["svd", "svd-llm", "obd"])
def test_eig_and_cholesky_solvers_agree(m, n, method):
    w, cx, cg = problem(m, n, seed=3)
    for rank in (1, 5, 11):
        fe = factorize(w, rank, method=method, cx=cx, cg=cg, solver="eig", damping=0.0)
        fc = factorize(w, rank, method=method, cx=cx, cg=cg, solver="cholesky", damping=0.0)
        assert fe.solver == "eig" and fc.solver == "cholesky"
        assert _rel(fe.predicted_loss, fc.predicted_loss) < 1e-8
        torch.testing.assert_close(fe.spectrum[:rank], fc.spectrum[:rank], rtol=1e-9, atol=0)
        torch.testing.assert_close(fe.to_dense(), fc.to_dense(), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("m,n", SHAPES)
@pytest.mark.parametrize("solver", ["eig", "cholesky"])
def test_default_damping_optimal_for_damped_covariances(m, n, solver):
    w, cx, cg = problem(m, n, seed=4)
    f = factorize(w, 6, cx=cx, cg=cg, solver=solver)  # damping=0.01 by default
    assert f.damping == {"cx": 0.01, "cg": 0.01}
    cxd, cgd = damp_covariance(cx, f.damping["cx"]), damp_covariance(cg, f.damping["cg"])
    assert _rel(kfac_loss(w - f.to_dense(), cxd, cgd), f.predicted_loss) < 1e-6
    undamped = factorize(w, 6, cx=cx, cg=cg, solver=solver, damping=0.0)
    assert kfac_loss(w - undamped.to_dense(), cxd, cgd) >= f.predicted_loss * (1 - 1e-9)


# --------------------------------------------------------------------------- nesting of the methods


@pytest.mark.parametrize("m,n", SHAPES)
@pytest.mark.parametrize("solver", ["eig", "cholesky"])
def test_identity_covariances_reduce_to_svd_llm_and_svd(m, n, solver):
    w, cx, _ = problem(m, n, seed=5)
    eye_m, eye_n = torch.eye(m, dtype=F64), torch.eye(n, dtype=F64)
    for rank in (2, 7):
        obd = factorize(w, rank, cx=cx, cg=eye_m, solver=solver, damping=0.0)
        llm = factorize(w, rank, method="svd-llm", cx=cx, solver=solver, damping=0.0)
        torch.testing.assert_close(obd.to_dense(), llm.to_dense(), rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(obd.spectrum, llm.spectrum, rtol=1e-9, atol=1e-12)
        assert llm.damping == {"cx": 0.0, "cg": 0.0}

        both = factorize(w, rank, cx=eye_n, cg=eye_m, solver=solver, damping=0.0)
        svd = factorize(w, rank, method="svd", solver=solver)
        torch.testing.assert_close(both.to_dense(), svd.to_dense(), rtol=1e-9, atol=1e-11)
        s = torch.linalg.svdvals(w)
        torch.testing.assert_close(svd.spectrum, s.square(), rtol=1e-9, atol=1e-12)
        assert _rel(svd.predicted_loss, 0.5 * float((w - svd.to_dense()).square().sum())) < 1e-8
        # Damping of an identity C_g scales λ but leaves the optimum unchanged.
        damped = factorize(w, rank, cx=cx, cg=eye_m, solver=solver, damping=0.5)
        ref = factorize(w, rank, method="svd-llm", cx=cx, solver=solver, damping=0.5)
        torch.testing.assert_close(damped.to_dense(), ref.to_dense(), rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(damped.spectrum, 1.5 * ref.spectrum, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- degenerate covariances


def _optimal_tail(w, cx, cg, rank):
    """Independent reference: ½ Σ_{i>r} σ_i² of R_gᵀ W S_x with eigen roots (valid for singular C)."""
    def root(c):
        d, q = torch.linalg.eigh(c)
        return q * d.clamp_min(0).sqrt()
    s = torch.linalg.svdvals(root(cg).T @ w @ root(cx))
    return 0.5 * float(s[rank:].square().sum())


@pytest.mark.parametrize("m,n", SHAPES)
def test_rank_deficient_cx_with_dead_channels(m, n):
    g = gen(6)
    w = torch.randn(m, n, generator=g, dtype=F64)
    cx = correlated_cov(n, 10, g, dead=3)  # 10 tokens < n, 3 dead channels: rank 10
    cg = correlated_cov(m, 4 * m, g)
    assert int(torch.linalg.matrix_rank(cx)) == 10
    for rank in (4, 10, 15, min(m, n)):
        f = factorize(w, rank, cx=cx, cg=cg, damping=0.0, keep_dense_at_break_even=False)
        assert torch.isfinite(f.b).all() and torch.isfinite(f.a).all()
        assert f.damping == {"cx": 0.0, "cg": 0.0}
        assert f.numerical_rank == 10
        true = kfac_loss(w - f.to_dense(), cx, cg)
        ref = _optimal_tail(w, cx, cg, rank)
        assert abs(true - f.predicted_loss) <= 1e-6 * max(ref, 1e-6 * f.spectrum[0].item())
        assert abs(true - ref) <= 1e-6 * max(ref, 1e-6 * f.spectrum[0].item())
    # At full rank the weight is reproduced on the range of C_x: ΔW C_x = 0.
    f = factorize(w, min(m, n), cx=cx, cg=cg, damping=0.0, keep_dense_at_break_even=False)
    assert float(((w - f.to_dense()) @ cx).abs().max()) < 1e-9 * float((w @ cx).abs().max())
    if m <= n:  # C_x only enters the Gram (no root, no division): every component is kept, W itself comes back
        torch.testing.assert_close(f.to_dense(), w, rtol=1e-8, atol=1e-8)
    # Damped (the default), the covariance is regular and the weight is reproduced exactly.
    f = factorize(w, min(m, n), cx=cx, cg=cg, keep_dense_at_break_even=False)
    torch.testing.assert_close(f.to_dense(), w, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("m,n", SHAPES)
def test_near_singular_and_singular_cg(m, n):
    g = gen(7)
    w = torch.randn(m, n, generator=g, dtype=F64)
    cx = correlated_cov(n, 4 * n, g)
    near = low_rank_cov(m, 5, g, eps=1e-13)
    exact = low_rank_cov(m, 5, g)
    for cg in (near, exact):
        for rank in (3, 5, 8):
            f = factorize(w, rank, cx=cx, cg=cg, damping=0.0)
            assert torch.isfinite(f.b).all() and torch.isfinite(f.a).all()
            cgd = damp_covariance(cg, f.damping["cg"])
            true = kfac_loss(w - f.to_dense(), cx, cgd)
            assert abs(true - f.predicted_loss) <= 1e-6 * f.spectrum[0].item()
            assert abs(true - _optimal_tail(w, cx, cgd, rank)) <= 1e-6 * f.spectrum[0].item()
    # The eig solver needs no extra damping for a singular C_g (it falls back to an eigen root);
    # the Cholesky solver escalates.
    f = factorize(w, 3, cx=cx, cg=exact, damping=0.0)
    assert f.damping == {"cx": 0.0, "cg": 0.0}
    fc = factorize(w, 3, cx=cx, cg=exact, damping=0.0, solver="cholesky")
    assert fc.damping["cg"] > 0 and fc.damping["cx"] == 0.0 and torch.isfinite(fc.b).all()


@pytest.mark.parametrize("m,n", SHAPES)
@pytest.mark.parametrize("solver", ["eig", "cholesky"])
@pytest.mark.parametrize("method", ["svd", "svd-llm", "obd"])
def test_full_rank_reproduces_weight(m, n, solver, method):
    w, cx, cg = problem(m, n, seed=8)
    f = factorize(w, min(m, n), method=method, cx=cx, cg=cg, solver=solver, damping=0.0,
                  keep_dense_at_break_even=False)
    assert f.rank == min(m, n) and f.predicted_loss <= 1e-10 * f.spectrum[0].item()
    torch.testing.assert_close(f.to_dense(), w, rtol=1e-7, atol=1e-9)


def test_zero_weight_and_zero_covariances():
    w = torch.zeros(6, 9, dtype=F64)
    f = factorize(w, 2, cx=torch.eye(9), cg=torch.eye(6))
    assert f.predicted_loss == 0.0 and f.numerical_rank == 0
    assert (f.b == 0).all() and (f.a == 0).all()
    w = torch.randn(6, 9, generator=gen(9), dtype=F64)
    for solver in ("eig", "cholesky"):
        f = factorize(w, 2, cx=torch.zeros(9, 9), cg=torch.eye(6), solver=solver)
        assert torch.isfinite(f.b).all() and torch.isfinite(f.a).all()
    # An all-zero C_g is insensitive to the weight; the damping turns it into α·I (SVD-LLM).
    f = factorize(w, 2, cx=torch.eye(9), cg=torch.zeros(6, 6))
    assert torch.isfinite(f.b).all() and f.damping["cg"] == 0.01


def test_damping_escalation_reports_and_gives_up():
    g = gen(10)
    w = torch.randn(2, 5, generator=g, dtype=F64)
    bad = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=F64)  # symmetric, positive diagonal, indefinite
    f = factorize(w, 1, cx=torch.eye(5), cg=bad, damping=0.0, solver="cholesky", keep_dense_at_break_even=False)
    # Needs α ≥ 1 (eigenvalue -1, mean diagonal 1): escalated ×10 from 1e-6 to ≈ 1.
    assert 0.999 < f.damping["cg"] < 1.001 and torch.isfinite(f.b).all()
    with pytest.raises(ValueError, match="^factorize: cg: Cholesky factorisation failed"):
        factorize(w, 1, cx=torch.eye(5), cg=bad, damping=0.0, damping_max=0.5, solver="cholesky")
    with pytest.raises(ValueError, match="^factorize: cx: Cholesky factorisation failed"):
        factorize(w.T, 1, method="svd-llm", cx=bad, solver="cholesky", damping=0.0, damping_max=0.5,
                  keep_dense_at_break_even=False)
    f = factorize(w.T, 1, method="svd-llm", cx=bad, solver="cholesky", damping=0.5, damping_growth=4.0,
                  keep_dense_at_break_even=False)
    assert f.damping == {"cx": 2.0, "cg": 0.0}
