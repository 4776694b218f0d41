"""Modules that serve a compressed model: ``LowRankLinear`` (two factors, bias kept).

``weight_a`` is [r, in] and ``weight_b`` is [out, r], so ``y = (x aᵀ) bᵀ + bias``;
the forward calls the ``obdk::lowrank_linear`` op, whose backend is picked by
device, dtype and shape (``OBDK_BACKEND`` forces one).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from . import ops


class LowRankLinear(nn.Module):
    """Drop-in replacement of ``nn.Linear(in_features, out_features)`` by two factors.

    Parameters: ``weight_a`` [rank, in_features], ``weight_b`` [out_features, rank],
    ``bias`` [out_features] or None. Input [..., in_features] → output [..., out_features].
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LowRankLinear: rank must be positive, got {rank}")
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.weight_a = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.weight_b = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None

    @classmethod
    def from_factors(cls, a: Tensor, b: Tensor, bias: Optional[Tensor] = None) -> "LowRankLinear":
        """Build from ``a`` [r, in] and ``b`` [out, r] (and ``bias`` [out]); tensors are copied."""
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise ValueError(f"LowRankLinear.from_factors: need a [r, in] and b [out, r], got {tuple(a.shape)} and {tuple(b.shape)}")
        mod = cls(a.shape[1], b.shape[0], a.shape[0], bias=bias is not None, device=a.device, dtype=a.dtype)
        with torch.no_grad():
            mod.weight_a.copy_(a)
            mod.weight_b.copy_(b.to(a.dtype))
            if bias is not None:
                mod.bias.copy_(bias.to(a.dtype))
        return mod

    @property
    def weight(self) -> Tensor:
        """The dense equivalent ``b @ a`` [out, in] (materialised on each access)."""
        return self.weight_b @ self.weight_a

    def forward(self, x: Tensor) -> Tensor:
        return ops.lowrank_linear(x, self.weight_a, self.weight_b, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}"
