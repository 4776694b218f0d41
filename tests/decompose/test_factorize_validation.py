"""Every ValueError path of factorize / spectrum / spectra / truncate names the offending argument."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from obdk.decompose import factorize, spectra, spectrum

M, N = 4, 6
W = torch.randn(M, N, generator=torch.Generator().manual_seed(0))
CX, CG = torch.eye(N), torch.eye(M)


def _nan(t, i=0, j=0, v=math.nan):
    t = t.clone()
    t[i, j] = v
    return t


CASES = [
    # (kwargs overriding the defaults, words the message must contain)
    (dict(weight=_nan(W)), ["weight", "non-finite"]),
    (dict(weight=_nan(W, v=math.inf)), ["weight", "non-finite"]),
    (dict(weight=torch.randn(2, 3, 4)), ["weight", "2-D", "[m, n]"]),
    (dict(weight=torch.randn(5)), ["weight", "2-D"]),
    (dict(weight=torch.empty(0, 4)), ["weight", "non-empty"]),
    (dict(weight=torch.ones(M, N, dtype=torch.int64)), ["weight", "floating point"]),
    (dict(weight=W.numpy()), ["weight", "torch.Tensor"]),
    (dict(cx=None), ["cx", f"[{N}, {N}]", "required", "obd"]),
    (dict(cx=None, method="svd-llm"), ["cx", "required", "svd-llm"]),
    (dict(cg=None), ["cg", f"[{M}, {M}]", "required"]),
    (dict(cx=torch.eye(M)), ["cx", f"[{N}, {N}]", f"({M}, {M})"]),
    (dict(cx=torch.ones(N, N + 1)), ["cx", "square", f"[{N}, {N}]"]),
    (dict(cx=torch.eye(N)[None].repeat(2, 1, 1)), ["cx", f"[{N}, {N}]"]),
    (dict(cg=torch.eye(N)), ["cg", f"[{M}, {M}]"]),
    (dict(cx=_nan(CX)), ["cx", "non-finite"]),
    (dict(cg=_nan(CG, 1, 2, math.inf)), ["cg", "non-finite"]),
    (dict(cx=CX + torch.triu(torch.ones(N, N), 1)), ["cx", "symmetric"]),
    (dict(cg=torch.randn(M, M, generator=torch.Generator().manual_seed(1))), ["cg", "symmetric"]),
    (dict(cx=-CX), ["cx", "positive semi-definite"]),
    (dict(cx=CX.to(torch.int32)), ["cx", "floating point"]),
    (dict(cx=[[1.0]]), ["cx", "torch.Tensor"]),
    (dict(rank=0), ["rank", "positive int"]),
    (dict(rank=-3), ["rank", "positive int"]),
    (dict(rank=2.0), ["rank", "positive int"]),
    (dict(rank=True), ["rank", "positive int"]),
    (dict(rank="2"), ["rank", "positive int"]),
    (dict(rank_multiple=0), ["rank_multiple", "positive int"]),
    (dict(rank_multiple=1.5), ["rank_multiple", "positive int"]),
    (dict(method="asvd"), ["method", "'svd', 'svd-llm', 'obd'"]),
    (dict(solver="qr"), ["solver", "'eig', 'cholesky'"]),
    (dict(compute_dtype=torch.float16), ["compute_dtype", "float64"]),
    (dict(damping=-0.1), ["damping", "non-negative"]),
    (dict(damping=math.nan), ["damping", "finite"]),
    (dict(damping=10.0, damping_max=1.0), ["damping", "damping_max"]),
    (dict(damping_max=math.inf), ["damping_max", "finite"]),
    (dict(damping_growth=1.0), ["damping_growth", "> 1"]),
    (dict(rtol=1.5), ["rtol", "[0, 1)"]),
    (dict(rtol=-1e-3), ["rtol", "[0, 1)"]),
    (dict(device="not-a-device"), ["device", "'not-a-device'"]),
]


@pytest.mark.parametrize("override,words", CASES, ids=[f"{i}-{'-'.join(map(str, c[0]))}" for i, c in enumerate(CASES)])
def test_factorize_value_errors(override, words):
    kw = dict(weight=W, rank=2, cx=CX, cg=CG)
    kw.update(override)
    with pytest.raises(ValueError) as err:
        factorize(kw.pop("weight"), kw.pop("rank"), **kw)
    msg = str(err.value)
    assert msg.startswith("factorize: ")
    for word in words:
        assert word in msg, (word, msg)


def test_spectrum_and_spectra_name_their_arguments():
    with pytest.raises(ValueError, match=r"^spectrum: cg .*required"):
        spectrum(W, cx=CX)
    with pytest.raises(ValueError, match=r"^spectrum: method"):
        spectrum(W, method="nope")
    with pytest.raises(ValueError, match=r"^spectra: weights must be a non-empty 3-D tensor \[B, m, n\]"):
        spectra(W, cxs=CX, cgs=CG)
    with pytest.raises(ValueError, match=r"^spectra: weights must be a tensor or a non-empty sequence"):
        spectra([W, W[:, :3]], cxs=CX, cgs=CG)
    with pytest.raises(ValueError, match=r"^spectra: weights must be a tensor or a non-empty sequence"):
        spectra([], cxs=CX, cgs=CG)
    with pytest.raises(ValueError, match=r"^spectra: cxs must be a square \[6, 6\] or \[2, 6, 6\]"):
        spectra([W, W], cxs=torch.eye(N)[None].repeat(3, 1, 1), cgs=CG)
    with pytest.raises(ValueError, match=r"^spectra: cgs contains non-finite"):
        spectra([W, W], cxs=CX, cgs=[CG, _nan(CG)])


def test_truncate_and_tail_loss_validate_rank():
    s = spectrum(W, cx=CX, cg=CG)
    with pytest.raises(ValueError, match=r"^Spectrum.truncate: rank must be a positive int"):
        s.truncate(0)
    with pytest.raises(ValueError, match=r"^Spectrum.truncate: rank_multiple must be a positive int"):
        s.truncate(2, rank_multiple=-8)
    with pytest.raises(ValueError, match=r"^Spectrum.tail_loss: rank must be a non-negative int"):
        s.tail_loss(-1)
    assert s.tail_loss(np.int64(1)) == s.tail_loss(1)  # numpy integers are ints


def test_low_precision_covariance_symmetry_tolerance():
    # A bf16 covariance with rounding-level asymmetry is accepted; a real asymmetry is not.
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, N, generator=g)
    c = x.T @ x
    eps = torch.finfo(torch.bfloat16).eps
    cx = (c + 0.25 * eps * c.abs().max() * torch.randn(N, N, generator=g)).bfloat16()
    assert not torch.equal(cx, cx.T)
    factorize(W, 2, cx=cx, cg=CG)
    with pytest.raises(ValueError, match="cx must be a symmetric covariance"):
        factorize(W, 2, cx=cx + torch.triu(torch.ones(N, N), 1).bfloat16() * cx.abs().max(), cg=CG)
