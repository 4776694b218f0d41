"""Spectrum: one decomposition, any rank; shapes and dtypes; break-even; batching."""
from __future__ import annotations

import pytest
import torch

from obdk.decompose import break_even_rank, damp_covariance, factorize, kfac_loss, spectra, spectrum
from tests.decompose.decompose_problems import F64, correlated_cov, gen, problem


def _reference(w, rank, method, cx, cg):
    return factorize(w.to(F64), rank, method=method, cx=cx, cg=cg, keep_dense_at_break_even=False)


@pytest.mark.parametrize("m,n", [(1, 1), (1, 7), (7, 1), (2, 3), (123, 257), (257, 123)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_shapes_and_dtypes(m, n, dtype):
    g = gen(m * 1000 + n)
    w64 = torch.randn(m, n, generator=g, dtype=F64)
    w = w64.to(dtype)
    cx = correlated_cov(n, 2 * n + 5, g).to(torch.float32)
    cg = correlated_cov(m, 2 * m + 5, g).to(torch.float32)
    k = min(m, n)
    spec = spectrum(w, cx=cx, cg=cg)
    ref = spec if dtype == F64 else spectrum(w64, cx=cx, cg=cg)
    eps = torch.finfo(dtype).eps
    for rank in sorted({1, max(1, k // 3), k}):
        f = spec.truncate(rank, keep_dense_at_break_even=False)
        assert f.b.dtype == dtype and f.a.dtype == dtype and f.b.device == w.device
        assert f.b.shape == (m, rank) and f.a.shape == (rank, n)
        assert f.spectrum.dtype == F64 and f.spectrum.shape == (k,)
        assert bool((f.spectrum[:-1] >= f.spectrum[1:]).all()) and bool((f.spectrum >= 0).all())
        # Relative error of the product: the rounding of the factors to the weight's dtype (a few eps).
        r = ref.truncate(rank, keep_dense_at_break_even=False).to_dense()
        assert float((f.to_dense().to(F64) - r).norm() / r.norm()) <= 8 * eps + 1e-12
        if rank == k:  # full rank: the weight itself
            assert float((f.to_dense().to(F64) - w64).norm() / w64.norm()) <= 8 * eps + 1e-10
    f = factorize(w, 1, cx=cx, cg=cg, keep_dense_at_break_even=False)
    assert f.b.dtype == dtype and torch.equal(f.b, spec.truncate(1, keep_dense_at_break_even=False).b)


@pytest.mark.parametrize("m,n", [(24, 40), (40, 24)])
def test_float32_compute_close_to_float64(m, n):
    w, cx, cg = problem(m, n, seed=11)
    for rank in (2, 8):
        f64 = factorize(w, rank, cx=cx, cg=cg)
        f32 = factorize(w, rank, cx=cx, cg=cg, compute_dtype=torch.float32)
        assert f32.b.dtype == F64  # factors come back in the weight's dtype
        assert abs(f32.predicted_loss - f64.predicted_loss) <= 1e-4 * f64.spectrum[0].item()
        torch.testing.assert_close(f32.to_dense(), f64.to_dense(), rtol=0, atol=1e-4 * float(w.abs().max()))


@pytest.mark.parametrize("m,n", [(64, 160), (160, 64)])
@pytest.mark.parametrize("solver", ["eig", "cholesky"])
def test_float32_compute_keeps_small_components(m, n, solver):
    # λ_45/λ_1 ≈ 5e-5: fp32 must not drop components that are well above its rounding level.
    g = gen(21)
    w = torch.randn(m, n, generator=g, dtype=F64) / n ** 0.5
    cx = correlated_cov(n, 2 * n, g, decay=1e-3, noise=1e-5)
    cg = correlated_cov(m, 2 * m, g, decay=1e-3, noise=1e-5)
    ref = spectrum(w, cx=cx, cg=cg)
    f32 = factorize(w, 45, cx=cx, cg=cg, solver=solver, compute_dtype=torch.float32)
    cxd, cgd = damp_covariance(cx, 0.01), damp_covariance(cg, 0.01)
    assert kfac_loss(w - f32.to_dense(), cxd, cgd) <= 1.01 * ref.tail_loss(45)


def test_factors_balanced_and_finite_in_fp16_with_tiny_gradient_scale():
    g = gen(12)
    w = (torch.randn(32, 48, generator=g) * 0.02).half()
    cx = correlated_cov(48, 200, g) * 1e4
    cg = correlated_cov(32, 200, g) * 1e-14  # gradient covariances are tiny; unbalanced factors overflow fp16
    f = factorize(w, 8, cx=cx, cg=cg)
    assert torch.isfinite(f.b).all() and torch.isfinite(f.a).all()
    torch.testing.assert_close(f.b.float().norm(dim=0), f.a.float().norm(dim=1), rtol=2e-3, atol=0)
    ref = _reference(w, 8, "obd", cx, cg)
    assert float((f.to_dense().double() - ref.to_dense()).abs().max()) < 2e-3 * float(w.abs().max())


@pytest.mark.parametrize("m,n", [(24, 40), (40, 24)])
@pytest.mark.parametrize("method", ["svd", "svd-llm", "obd"])
@pytest.mark.parametrize("solver", ["eig", "cholesky"])
def test_truncate_equals_factorize_and_tail_loss(m, n, method, solver):
    w, cx, cg = problem(m, n, seed=13)
    spec = spectrum(w, method=method, cx=cx, cg=cg, solver=solver)
    assert spec.shape == (m, n) and spec.max_rank == min(m, n)
    for rank in (1, 4, 7, 14, min(m, n)):
        t = spec.truncate(rank, keep_dense_at_break_even=False)
        f = factorize(w, rank, method=method, cx=cx, cg=cg, solver=solver, keep_dense_at_break_even=False)
        assert torch.equal(t.b, f.b) and torch.equal(t.a, f.a)
        assert t.predicted_loss == f.predicted_loss == spec.tail_loss(rank)
        assert t.damping == f.damping == spec.damping and t.numerical_rank == f.numerical_rank
        assert torch.equal(t.spectrum, spec.eigenvalues)
    assert spec.tail_loss(0) == pytest.approx(0.5 * float(spec.eigenvalues.sum()), rel=1e-12)
    assert spec.tail_loss(10 ** 6) == 0.0
    # The tail loss is the loss actually incurred (in the damped metric).
    cxd = damp_covariance(cx, spec.damping["cx"]) if method != "svd" else None
    cgd = damp_covariance(cg, spec.damping["cg"]) if method == "obd" else None
    t = spec.truncate(5)
    assert kfac_loss(w - t.to_dense(), cxd, cgd) == pytest.approx(spec.tail_loss(5), rel=1e-6)


# --------------------------------------------------------------------------- break-even and rounding


def test_break_even_rank():
    assert break_even_rank(64, 64) == 32.0
    assert break_even_rank(24, 40) == 15.0
    assert break_even_rank(1, 1) == 0.5
    with pytest.raises(ValueError, match="m and n"):
        break_even_rank(0, 3)


def test_break_even_returns_dense_unchanged():
    w, cx, cg = problem(24, 40, seed=14)  # break-even 15
    for rank in (15, 16, 24, 100):
        f = factorize(w, rank, cx=cx, cg=cg)
        assert f.dense and f.b is None and f.a is None and f.weight is w
        assert f.predicted_loss == 0.0 and f.to_dense() is w and f.num_params == w.numel()
        assert f.spectrum.shape == (24,)
    f = factorize(w, 14, cx=cx, cg=cg)
    assert not f.dense and f.weight is None and f.num_params == 14 * 64 < w.numel()
    f = factorize(w, 16, cx=cx, cg=cg, keep_dense_at_break_even=False)
    assert not f.dense and f.rank == 16
    f = factorize(w, 100, cx=cx, cg=cg, keep_dense_at_break_even=False)
    assert f.rank == 24  # clamped to min(m, n)
    f = factorize(torch.ones(1, 1), 1, method="svd")  # 1×1: break-even 0.5, always dense
    assert f.dense


def test_compact_keeps_every_factored_rank_and_refuses_beyond():
    """``Spectrum.compact``: the leading components in the weight's dtype; every truncation up to the cut is the
    full spectrum's, bit for bit; the eigenvalues (allocation costs, tail losses) stay whole; beyond: an error."""
    from obdk.allocate.budget import max_factored_rank
    from obdk.errors import DataError
    w, cx, cg = problem(24, 40, seed=14)  # break-even 15: the largest factored rank is 14
    w32 = w.float()
    full = spectrum(w32, cx=cx, cg=cg, compute_dtype=F64)
    R = max_factored_rank(24, 40)
    small = full.compact(R, dtype=w32.dtype)
    assert R == 14 and small.factor_b.shape == (24, R) and small.factor_a.shape == (R, 40)
    assert small.factor_b.dtype == small.factor_a.dtype == torch.float32 and full.factor_b.dtype == F64
    assert small.factor_b.is_contiguous() and small.factor_b.untyped_storage().nbytes() == 24 * R * 4
    assert small.eigenvalues is full.eigenvalues and small.kept == R and small.weight is w32
    for rank in (1, 7, R):
        t, f = small.truncate(rank, keep_dense_at_break_even=False), full.truncate(rank, keep_dense_at_break_even=False)
        assert torch.equal(t.b, f.b) and torch.equal(t.a, f.a) and t.predicted_loss == f.predicted_loss
    assert small.truncate(15).dense and small.truncate(100).dense  # at or above break-even: dense, as before
    with pytest.raises(DataError, match="rank 15 needs 15 components .* carry 14"):
        small.truncate(15, keep_dense_at_break_even=False)
    assert full.compact(100).factor_b.shape == (24, 24)  # never more than carried
    assert full.compact(R, dtype=torch.float64).factor_b.dtype == F64  # never widened
    assert full.compact(R).factor_b.dtype == F64
    with pytest.raises(DataError, match="max_rank must be a positive int"):
        full.compact(0)


@pytest.mark.parametrize("rank,multiple,expected", [(13, 8, 16), (11, 8, 8), (12, 8, 16), (3, 8, 8), (1, 8, 8),
                                                    (20, 8, 24), (27, 8, 24), (7, 1, 7), (30, 4, 32)])
def test_rank_multiple_rounding(rank, multiple, expected):
    w = torch.randn(64, 96, generator=gen(15), dtype=F64)  # break-even 38.4
    f = factorize(w, rank, method="svd", rank_multiple=multiple)
    assert not f.dense and f.rank == expected and f.b.shape == (64, expected)


def test_rank_multiple_rounding_before_break_even_check():
    w = torch.randn(64, 64, generator=gen(16), dtype=F64)  # break-even 32
    assert factorize(w, 30, method="svd", rank_multiple=8).dense  # 30 → 32 ≥ 32
    f = factorize(w, 27, method="svd", rank_multiple=8)  # 27 → 24
    assert not f.dense and f.rank == 24
    assert not factorize(w, 31, method="svd").dense
    assert factorize(w, 32, method="svd").dense


# --------------------------------------------------------------------------- batching


@pytest.mark.parametrize("m,n", [(24, 40), (40, 24)])
@pytest.mark.parametrize("solver", ["eig", "cholesky"])
def test_spectra_batch_equals_individual(m, n, solver):
    g = gen(17)
    ws = torch.randn(3, m, n, generator=g, dtype=F64)
    cx = correlated_cov(n, 4 * n, g)  # shared input (q/k/v, gate/up)
    cgs = [correlated_cov(m, 4 * m, g) for _ in range(3)]
    batch = spectra(ws, cxs=cx, cgs=cgs, solver=solver)
    listed = spectra(list(ws), cxs=[cx] * 3, cgs=torch.stack(cgs), solver=solver)
    for i in range(3):
        one = spectrum(ws[i], cx=cx, cg=cgs[i], solver=solver)
        for s in (batch[i], listed[i]):
            atol = 1e-12 * one.eigenvalues[0].item()
            torch.testing.assert_close(s.eigenvalues, one.eigenvalues, rtol=1e-9, atol=atol)
            a, b = s.truncate(5).to_dense(), one.truncate(5).to_dense()
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
            assert s.damping == one.damping
        assert batch[i].weight is not None and torch.equal(batch[i].weight, ws[i])


def test_spectra_damping_escalates_per_matrix():
    g = gen(18)
    ws = torch.randn(2, 2, 5, generator=g, dtype=F64)
    good = torch.eye(2, dtype=F64)
    bad = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=F64)
    out = spectra(ws, cxs=torch.eye(5, dtype=F64), cgs=[good, bad], damping=0.0, solver="cholesky")
    assert out[0].damping["cg"] == 0.0 and out[1].damping["cg"] > 0.5


def test_explicit_device_and_svd_ignores_covariances(caplog):
    w, cx, cg = problem(10, 12, seed=19)
    f = factorize(w, 3, cx=cx, cg=cg, device="cpu")
    assert f.b.device == w.device
    with caplog.at_level("DEBUG", logger="obdk.decompose"):
        s = factorize(w, 3, method="svd", cx=cx, cg=cg)
    assert s.damping == {"cx": 0.0, "cg": 0.0}
    torch.testing.assert_close(s.to_dense(), factorize(w, 3, method="svd").to_dense())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("m,n", [(24, 40), (40, 24)])
def test_cuda_compute_device_matches_cpu(m, n):
    w, cx, cg = problem(m, n, seed=20)
    for solver in ("eig", "cholesky"):
        cpu = factorize(w, 6, cx=cx, cg=cg, solver=solver)
        gpu = factorize(w, 6, cx=cx, cg=cg, solver=solver, device="cuda")
        assert gpu.b.device == w.device and gpu.spectrum.device == w.device
        torch.testing.assert_close(gpu.to_dense(), cpu.to_dense(), rtol=1e-8, atol=1e-10)
        on_gpu = factorize(w.cuda().float(), 6, cx=cx.cuda(), cg=cg.cuda(), solver=solver)
        assert on_gpu.b.is_cuda and on_gpu.b.dtype == torch.float32
        torch.testing.assert_close(on_gpu.to_dense().cpu().double(), cpu.to_dense(), rtol=0, atol=1e-5)
