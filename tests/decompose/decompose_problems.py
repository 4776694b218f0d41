"""Random problems for the decomposition tests: weights and strongly correlated covariances."""
from __future__ import annotations

import torch
from torch import Tensor

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def correlated_cov(k: int, tokens: int, g: torch.Generator, *, decay: float = 1e-2, noise: float = 1e-3,
                   dead: int = 0) -> Tensor:
    """``XᵀX/N`` [k, k] fp64 from Gaussian samples with a decaying spectrum in a random basis.

    ``decay``: ratio of the last to the first standard deviation; ``noise``: isotropic noise std;
    ``dead``: the last ``dead`` channels are exactly zero (dead inputs). ``tokens < k`` gives a
    rank-deficient covariance.
    """
    q, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=F64))
    std = torch.logspace(0, torch.log10(torch.tensor(decay)).item(), k, dtype=F64)
    x = (torch.randn(tokens, k, generator=g, dtype=F64) * std) @ q.T
    x = x + noise * torch.randn(tokens, k, generator=g, dtype=F64)
    if dead:
        x[:, k - dead:] = 0
    return x.T @ x / tokens


def low_rank_cov(k: int, rank: int, g: torch.Generator, eps: float = 0.0) -> Tensor:
    """A rank-``rank`` PSD matrix [k, k] (plus ``eps·I``), fp64."""
    z = torch.randn(k, rank, generator=g, dtype=F64)
    return z @ z.T / rank + eps * torch.eye(k, dtype=F64)


def problem(m: int, n: int, seed: int = 0, **kw):
    """(W [m, n], C_x [n, n], C_g [m, m]) fp64 with well-conditioned but correlated covariances."""
    g = gen(seed)
    w = torch.randn(m, n, generator=g, dtype=F64) / n ** 0.5
    return w, correlated_cov(n, 4 * n + 10, g, **kw), correlated_cov(m, 4 * m + 10, g, **kw)


def batched_loss(delta: Tensor, cx: Tensor, cg: Tensor) -> Tensor:
    """``½ tr(C_g Δ C_x Δᵀ)`` for a batch ``delta`` [B, m, n] → [B] (fp64)."""
    return 0.5 * ((cg @ delta) * (delta @ cx)).sum((-2, -1))
