"""obdk's operators, each declared once with ``torch.library.custom_op``.

* ``obdk::gram_acc_(acc, x, alpha)`` — in place ``acc += alpha * xᵀx`` for the
  calibration statistics (``acc``: [n, n] fp32/fp64; ``x``: [..., n]).
* ``obdk::lowrank_linear(x, a, b, bias)`` — ``y = (x aᵀ) bᵀ + bias`` for
  inference (``x``: [..., n]; ``a``: [r, n]; ``b``: [m, r]; ``bias``: [m]).

The body of each op dispatches through :mod:`obdk.backends` (C++ on CPU;
Triton or CUDA C++ on GPU; pure PyTorch everywhere). The ``*_reference``
functions are the fp64/fp32 oracles the tests compare against.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from . import _ext
from .backends import Candidate, register, select
from .errors import DataError

# --------------------------------------------------------------------------- reference


def lowrank_linear_reference(x: Tensor, a: Tensor, b: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Oracle ``(x aᵀ) bᵀ + bias`` computed in fp32 with an fp32 intermediate.

    Shapes: ``x`` [..., n], ``a`` [r, n], ``b`` [m, r], ``bias`` [m] → [..., m] (fp32).
    """
    y = (x.float() @ a.float().T) @ b.float().T
    if bias is not None:
        y = y + bias.float()
    return y


# --------------------------------------------------------------------------- gram_acc_


def _check_gram(acc: Tensor, x: Tensor) -> None:
    if acc.dim() != 2 or acc.shape[0] != acc.shape[1]:
        raise DataError(f"gram_acc_: acc must be a square [n, n] matrix, got shape {tuple(acc.shape)}")
    if acc.dtype not in (torch.float32, torch.float64):
        raise DataError(f"gram_acc_: acc must be float32 or float64 (statistics accumulate in fp32 or better), got {acc.dtype}")
    if x.shape[-1] != acc.shape[0]:
        raise DataError(f"gram_acc_: x must be [..., {acc.shape[0]}], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise DataError(f"gram_acc_: x must be floating point, got {x.dtype}")
    if x.device != acc.device:
        raise DataError(f"gram_acc_: x is on {x.device} but acc is on {acc.device}")


@torch.library.custom_op("obdk::gram_acc_", mutates_args=("acc",))
def gram_acc_(acc: Tensor, x: Tensor, alpha: float = 1.0) -> None:
    """In place ``acc += alpha * xᵀx``. ``acc``: [n, n] fp32/fp64 contiguous; ``x``: [..., n] float.

    Token rows of ``x`` are flattened; the result stays exactly symmetric.
    """
    _check_gram(acc, x)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] == 0:
        return
    select("gram_acc_", acc.device, x.dtype).fn(acc, x2, float(alpha))


@gram_acc_.register_fake
def _(acc: Tensor, x: Tensor, alpha: float = 1.0) -> None:
    return None


def _gram_torch(acc: Tensor, x2: Tensor, alpha: float) -> None:
    # Chunked upcast so a 16-bit activation never needs a full-size copy.
    chunk = max(1, (64 << 20) // max(1, x2.shape[1] * acc.element_size()))
    for s in range(0, x2.shape[0], chunk):
        xs = x2[s:s + chunk].to(acc.dtype)
        acc.addmm_(xs.T, xs, alpha=alpha)


# --------------------------------------------------------------------------- lowrank_linear


def _check_lowrank(x: Tensor, a: Tensor, b: Tensor, bias: Optional[Tensor]) -> None:
    if a.dim() != 2 or b.dim() != 2:
        raise DataError(f"lowrank_linear: a must be [r, n] and b [m, r], got {tuple(a.shape)} and {tuple(b.shape)}")
    if x.shape[-1] != a.shape[1]:
        raise DataError(f"lowrank_linear: x has {x.shape[-1]} features but a is {tuple(a.shape)} (expected [r, {x.shape[-1]}])")
    if b.shape[1] != a.shape[0]:
        raise DataError(f"lowrank_linear: b is {tuple(b.shape)} but a has rank {a.shape[0]} (expected [m, {a.shape[0]}])")
    if bias is not None and bias.shape != (b.shape[0],):
        raise DataError(f"lowrank_linear: bias must be [{b.shape[0]}], got {tuple(bias.shape)}")


@torch.library.custom_op("obdk::lowrank_linear", mutates_args=())
def lowrank_linear(x: Tensor, a: Tensor, b: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``y = (x aᵀ) bᵀ + bias``. ``x`` [..., n], ``a`` [r, n], ``b`` [m, r], ``bias`` [m] → [..., m]."""
    _check_lowrank(x, a, b, bias)
    return select("lowrank_linear", x.device, x.dtype).fn(x, a, b, bias)


@lowrank_linear.register_fake
def _(x: Tensor, a: Tensor, b: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    return x.new_empty((*x.shape[:-1], b.shape[0]))


def _lowrank_setup_context(ctx, inputs, output):
    x, a, b, bias = inputs
    ctx.save_for_backward(x, a, b)
    ctx.has_bias = bias is not None


def _lowrank_backward(ctx, gy):
    x, a, b = ctx.saved_tensors
    x2 = x.reshape(-1, x.shape[-1])
    g2 = gy.reshape(-1, gy.shape[-1])
    gt = g2 @ b                      # [M, r]
    gx = (gt @ a).view(x.shape) if ctx.needs_input_grad[0] else None
    ga = gt.T @ x2 if ctx.needs_input_grad[1] else None
    gb = g2.T @ (x2 @ a.T) if ctx.needs_input_grad[2] else None
    gbias = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
    return gx, ga, gb, gbias


lowrank_linear.register_autograd(_lowrank_backward, setup_context=_lowrank_setup_context)


def _lowrank_torch(x: Tensor, a: Tensor, b: Tensor, bias: Optional[Tensor]) -> Tensor:
    t = x @ a.T
    return torch.nn.functional.linear(t, b, bias)


# --------------------------------------------------------------------------- registration


def _triton_available(device: str) -> str | None:
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton runs CPU tensors only under TRITON_INTERPRET=1"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover
        return f"triton not importable: {exc}"
    return None


def _ext_available(name: str):
    def check(device: str) -> str | None:
        if _ext.has(name):
            return None
        return f"obdk._C has no {name} ({_ext.load_error or 'not built for this device'})"
    return check


def _lazy(module: str, attr: str):
    """Import a kernel launcher on first call (Triton JIT setup stays off import)."""
    def call(*args):
        import importlib
        return getattr(importlib.import_module(module), attr)(*args)
    call.__name__ = f"{module}.{attr}"
    return call


def _native(name: str):
    def call(*args):
        return getattr(_ext._C, name)(*args)
    call.__name__ = f"obdk._C.{name}"
    return call


_FLOAT = (torch.float32, torch.float16, torch.bfloat16)

register("gram_acc_", Candidate("triton", _lazy("obdk.kernels.gram", "gram_acc_triton"), ("cuda", "cpu"),
                                _FLOAT, _triton_available, auto=lambda d: d == "cuda"))
register("gram_acc_", Candidate("cuda", _native("gram_acc_cuda"), ("cuda",), _FLOAT, _ext_available("gram_acc_cuda")))
register("gram_acc_", Candidate("cpp", _native("gram_acc_cpu"), ("cpu",), None, _ext_available("gram_acc_cpu")))
register("gram_acc_", Candidate("torch", _gram_torch, ("cpu", "cuda", "meta", "mps", "xpu")))

register("lowrank_linear", Candidate("triton", _lazy("obdk.kernels.lowrank", "lowrank_linear_triton"), ("cuda", "cpu"),
                                     _FLOAT, _triton_available, auto=lambda d: d == "cuda"))
register("lowrank_linear", Candidate("cuda", _native("lowrank_linear_cuda"), ("cuda",), _FLOAT,
                                     _ext_available("lowrank_linear_cuda")))
register("lowrank_linear", Candidate("cpp", _native("lowrank_linear_cpu"), ("cpu",), None, _ext_available("lowrank_linear_cpu")))
register("lowrank_linear", Candidate("torch", _lowrank_torch, ("cpu", "cuda", "meta", "mps", "xpu")))
