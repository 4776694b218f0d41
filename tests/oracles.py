"""Oracles the kernel and module tests compare against (fp64/fp32 references, no obdk code)."""
import torch
from torch import Tensor


def gram_reference(x: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """Oracle ``xᵀx`` in ``dtype`` (fp64 by default). ``x``: [..., n] → [n, n]."""
    x2 = x.reshape(-1, x.shape[-1]).to(dtype)
    return x2.T @ x2
