"""The cheap finiteness checks, the in-place covariance preparation and the damped Gram are exact
replacements of the straightforward expressions they stand for."""
import pytest
import torch

from obdk.decompose.closed_form import _gram, _prepare_cov
from obdk.decompose.roots import add_damping, all_finite, finite_per_element, normalize_cov


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_all_finite_matches_elementwise_check(dtype):
    big = torch.finfo(dtype).max
    cases = [torch.zeros(0, dtype=dtype), torch.randn(7, 5).to(dtype),
             torch.tensor([big, big], dtype=dtype),          # finite entries whose sum overflows
             torch.tensor([1.0, float("nan")], dtype=dtype), torch.tensor([float("inf"), 1.0], dtype=dtype),
             torch.tensor([float("inf"), float("-inf")], dtype=dtype), torch.tensor([-float("inf")], dtype=dtype)]
    for t in cases:
        assert all_finite(t) == bool(torch.isfinite(t).all()), t
    assert all_finite(torch.arange(5))  # integers are always finite


def test_finite_per_element():
    t = torch.randn(4, 3, 3, dtype=torch.float64)
    assert finite_per_element(t).tolist() == [True] * 4
    t[1, 2, 0] = float("nan")
    t[3, 0, 0] = float("inf")
    t[2] = torch.finfo(torch.float64).max  # finite, but its sum overflows
    assert finite_per_element(t).tolist() == [True, False, True, False]


def test_add_damping_broadcasts_a_shared_covariance():
    c = torch.randn(1, 4, 4, dtype=torch.float64)
    out = add_damping(c, [0.5, 2.0])
    eye = torch.eye(4, dtype=torch.float64)
    assert out.shape == (2, 4, 4)
    torch.testing.assert_close(out, c + torch.tensor([0.5, 2.0], dtype=torch.float64)[:, None, None] * eye,
                               rtol=0, atol=0)
    assert add_damping(c, [0.0]) is c
    before = c.clone()
    add_damping(c, [1.0])
    assert torch.equal(c, before)  # never modifies its input


@pytest.mark.parametrize("alpha", [[0.0], [0.01], [0.01, 1e-4, 0.3]])
def test_gram_damps_without_copying_the_covariance(alpha):
    g = torch.Generator().manual_seed(0)
    T = torch.randn(3, 5, 9, generator=g, dtype=torch.float64)
    x = torch.randn(20, 9, generator=g, dtype=torch.float64)
    C = (x.T @ x).unsqueeze(0)
    ref = T @ add_damping(C, alpha if len(alpha) > 1 else alpha * 3) @ T.mT
    torch.testing.assert_close(_gram(T, C, alpha), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_gram(T, None, alpha), T @ T.mT, rtol=0, atol=0)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("cd", [torch.float32, torch.float64])
def test_prepare_cov_equals_normalised_symmetrisation(symmetric, cd):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 6, generator=g)
    c = (x.T @ x).unsqueeze(0).repeat(2, 1, 1)
    c[1] *= 3.0
    if not symmetric:
        c = c + 1e-4 * torch.randn(2, 6, 6, generator=g)
    c_in = c.clone()
    w = c.to(cd)
    want, want_s = normalize_cov((w + w.mT) / 2)
    got, got_s = _prepare_cov(c, c.device, cd, torch.equal(c, c.mT))  # the flag _check_cov computes
    assert got.dtype == cd and torch.equal(got, got.mT)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_s, want_s, rtol=0, atol=0)
    assert torch.equal(c, c_in)  # the caller's statistics are untouched
    # an all-zero covariance keeps scale 1
    z, zs = _prepare_cov(torch.zeros(1, 3, 3), torch.device("cpu"), cd, True)
    assert float(zs) == 1.0 and not z.any()
