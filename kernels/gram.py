"""Symmetric Gram accumulation in Triton: ``acc += alpha * xᵀx`` (``obdk::gram_acc_``).

Design (DESIGN.md §3):

* **Upper-triangle tiles only.** The grid's first axis enumerates the
  ``nt (nt + 1) / 2`` tiles ``(i, j)`` with ``i <= j`` of the ``[n, n]`` result,
  column by column, so neighbouring programs share the ``x[:, j-block]`` operand
  in L2. Each program computes its ``BLOCK × BLOCK`` tile ``x[:, I]ᵀ x[:, J]``
  and then adds ``alpha * tile`` to ``acc[I, J]`` (its upper part, ``p <= q``)
  and the same values to ``acc[J, I]`` (the strictly-upper part, transposed).
  The lower half is therefore a bitwise copy of the upper half: the result
  stays exactly symmetric, also for diagonal tiles, whatever the MMA order
  (the kernels are compiled without FMA contraction so both halves round alike).
* **fp32 accumulation.** ``tl.dot`` takes the 16-bit operands as they are
  (tensor cores) and accumulates in fp32; fp32 inputs use
  ``input_precision="ieee"`` (no TF32). An fp64 ``acc`` gets the fp32 tile
  added in fp64 (``alpha`` is applied in fp32 precision).
* **Deterministic, no atomics.** Every element of ``acc`` is written by exactly
  one program, which loops over its tokens in a fixed order. When there are
  fewer tiles than SMs (small ``n``, many tokens) the tokens are split into
  ``S`` contiguous chunks: split ``s`` writes its partial tile to an fp32
  workspace ``[S, tiles, BLOCK, BLOCK]`` and a second kernel sums the ``S``
  partials in order ``0..S-1`` before the same symmetric update. The split and
  the block sizes are a pure function of ``(n, T, dtype, SM count)`` (a
  heuristic table, not ``triton.autotune``: autotuning would benchmark an
  in-place kernel and could pick different tiles, hence different bits, in
  different processes), so a given machine reproduces results bitwise.
* **Any strides, any sizes.** ``x`` may be non-contiguous; odd ``n`` and ``T``
  are masked. Offsets are computed in int64.

Under ``TRITON_INTERPRET=1`` (CPU tensors) the blocks are small (16/32) so the
interpreter runs fast, and 16-bit operands are upcast to fp32 before ``tl.dot``
(exact: a product of two 16-bit floats is exact in fp32), which also makes
bf16 correct there. The kernels use only builtins of ``triton.language`` (``tl.full``,
not the ``@jit`` ``tl.zeros`` of ``triton.language.standard``), so this module,
imported under ``TRITON_INTERPRET=1``, runs interpreted even when ``triton`` itself
was imported before the variable was set.
"""
from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

__all__ = ["gram_acc_triton", "GramConfig", "pick_config", "interpreted"]


# --------------------------------------------------------------------------- kernels


@triton.jit
def _upper_tile(pid):
    """Tile ``(i, j)``, ``i <= j``, of the ``pid``-th upper tile, column by column:
    (0,0) (0,1) (1,1) (0,2) (1,2) (2,2) ..."""
    j = ((tl.sqrt((8 * pid + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    # the float estimate may be off by one either way (approximate sqrt): fix it
    j = tl.where((j + 1) * (j + 2) // 2 <= pid, j + 1, j)
    j = tl.where(j * (j + 1) // 2 > pid, j - 1, j)
    i = pid - j * (j + 1) // 2
    return i, j


@triton.jit
def _apply_symmetric(acc_ptr, tile, rm, rn, N, stride_a0, stride_a1, alpha, ACC_F64: tl.constexpr):
    """acc[rm, rn] += alpha*tile where rm <= rn; acc[rn, rm] += the same values where rm < rn."""
    if ACC_F64:
        upd = tile.to(tl.float64) * alpha
    else:
        upd = tile * alpha
    inb = (rm < N)[:, None] & (rn < N)[None, :]
    up = inb & (rm[:, None] <= rn[None, :])
    p = acc_ptr + rm.to(tl.int64)[:, None] * stride_a0 + rn.to(tl.int64)[None, :] * stride_a1
    tl.store(p, tl.load(p, mask=up, other=0.0) + upd, mask=up)
    lo = inb & (rm[:, None] < rn[None, :])
    q = acc_ptr + rn.to(tl.int64)[None, :] * stride_a0 + rm.to(tl.int64)[:, None] * stride_a1
    tl.store(q, tl.load(q, mask=lo, other=0.0) + upd, mask=lo)


@triton.jit
def _gram_step(tile, a_ptrs, b_ptrs, k_ok, m_ok, n_ok, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """tile += x[t:t+BLOCK_K, I]ᵀ x[t:t+BLOCK_K, J] (rows past the end masked to zero)."""
    a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
    b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, tile, input_precision=PRECISION)


@triton.jit
def _gram_tile_kernel(
    x_ptr, acc_ptr, ws_ptr,
    T, N, stride_xt, stride_xn, stride_a0, stride_a1,
    alpha, tokens_per_split, num_tiles,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, SPLIT: tl.constexpr, ACC_F64: tl.constexpr, INTERP: tl.constexpr,
):
    pid = tl.program_id(0)
    sid = tl.program_id(1)
    i, j = _upper_tile(pid)
    rm = i * BLOCK + tl.arange(0, BLOCK)
    rn = j * BLOCK + tl.arange(0, BLOCK)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < N
    n_ok = rn < N

    if SPLIT:  # a split runs a fixed `tokens_per_split` steps; the last one is masked past T
        t_start = sid * tokens_per_split
        t_count = tokens_per_split
    else:
        t_start = 0
        t_count = T
    rows = (t_start + rk).to(tl.int64) * stride_xt
    # a = x[t, I]ᵀ as [BLOCK, BLOCK_K]; b = x[t, J] as [BLOCK_K, BLOCK]
    a_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xn + rows[None, :]
    b_ptrs = x_ptr + rows[:, None] + rn.to(tl.int64)[None, :] * stride_xn
    step = BLOCK_K * stride_xt

    tile = tl.full((BLOCK, BLOCK), 0.0, tl.float32)  # tl.full: a builtin, unlike the @jit tl.zeros
    if INTERP:  # the interpreter of Triton 3.6 cannot take scalar arguments as range() bounds
        t = 0
        while t < t_count:
            tile = _gram_step(tile, a_ptrs, b_ptrs, (t_start + t + rk) < T, m_ok, n_ok, PRECISION, UPCAST)
            a_ptrs += step
            b_ptrs += step
            t += BLOCK_K
    else:
        for t in range(0, t_count, BLOCK_K):
            tile = _gram_step(tile, a_ptrs, b_ptrs, (t_start + t + rk) < T, m_ok, n_ok, PRECISION, UPCAST)
            a_ptrs += step
            b_ptrs += step

    if SPLIT:
        r = tl.arange(0, BLOCK)
        offs = (sid * num_tiles + pid).to(tl.int64) * (BLOCK * BLOCK) + r[:, None] * BLOCK + r[None, :]
        tl.store(ws_ptr + offs, tile)
    else:
        _apply_symmetric(acc_ptr, tile, rm, rn, N, stride_a0, stride_a1, alpha, ACC_F64)


@triton.jit
def _gram_reduce_kernel(
    ws_ptr, acc_ptr, N, stride_a0, stride_a1, alpha, num_tiles, num_splits,
    BLOCK: tl.constexpr, ACC_F64: tl.constexpr, INTERP: tl.constexpr,
):
    """Sum the split partials of one tile in order 0..S-1, then apply it symmetrically."""
    pid = tl.program_id(0)
    i, j = _upper_tile(pid)
    r = tl.arange(0, BLOCK)
    offs = pid.to(tl.int64) * (BLOCK * BLOCK) + r[:, None] * BLOCK + r[None, :]
    ptrs = ws_ptr + offs
    tile = tl.full((BLOCK, BLOCK), 0.0, tl.float32)
    if INTERP:
        s = 0
        while s < num_splits:
            tile += tl.load(ptrs)
            ptrs += num_tiles * (BLOCK * BLOCK)
            s += 1
    else:
        for _ in range(0, num_splits):
            tile += tl.load(ptrs)
            ptrs += num_tiles * (BLOCK * BLOCK)
    _apply_symmetric(acc_ptr, tile, i * BLOCK + r, j * BLOCK + r, N, stride_a0, stride_a1, alpha, ACC_F64)


# --------------------------------------------------------------------------- configuration


class GramConfig(NamedTuple):
    block: int        # square output tile (BLOCK × BLOCK)
    block_k: int      # tokens per tl.dot step
    num_warps: int
    num_stages: int
    split: int        # token splits (1: no workspace, single kernel)


_MIN_TOKENS_PER_SPLIT = 1024
_MAX_SPLIT = 64
_MAX_WORKSPACE_BYTES = 256 << 20


def interpreted() -> bool:
    """True when this module's kernels were defined under ``TRITON_INTERPRET=1``."""
    return not isinstance(_gram_tile_kernel, JITFunction)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_tiles(n: int, block: int) -> int:
    nt = triton.cdiv(n, block)
    return nt * (nt + 1) // 2


def pick_config(n: int, T: int, dtype: torch.dtype, device: torch.device) -> GramConfig:
    """The tile shape and token split for an ``[T, n]`` input (deterministic heuristic)."""
    if device.type != "cuda" or interpreted():
        block = 16 if n <= 16 else 32
        return GramConfig(block, 32 if T >= 32 else 16, 1, 1, 1)
    if dtype == torch.float32:  # ieee fp32: FMA path, keep the tile modest
        block, block_k, warps, stages = 64, 32, 4, 3
    elif n >= 2048:
        block, block_k, warps, stages = 128, 64, 8, 3
    else:
        block, block_k, warps, stages = 64, 64, 4, 4
    tiles = _num_tiles(n, block)
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    split = 1
    if tiles < sms:
        split = min(triton.cdiv(2 * sms, tiles), max(1, T // _MIN_TOKENS_PER_SPLIT), _MAX_SPLIT,
                    max(1, _MAX_WORKSPACE_BYTES // (tiles * block * block * 4)))
    return GramConfig(block, block_k, warps, stages, max(1, split))


# --------------------------------------------------------------------------- launcher


def gram_acc_triton(acc: torch.Tensor, x: torch.Tensor, alpha: float = 1.0, *,
                    config: GramConfig | None = None) -> None:
    """In place ``acc += alpha * xᵀx`` with the symmetric Triton kernel.

    ``acc``: [n, n] float32 (or float64: the fp32 tile is added in fp64);
    ``x``: [T, n] float16/bfloat16/float32, any strides. ``config`` overrides
    :func:`pick_config` (tests, benchmarks). CPU tensors need ``TRITON_INTERPRET=1``
    set before this module is imported.
    """
    if x.dim() != 2:
        raise ValueError(f"gram_acc_triton: x must be 2-D [T, n], got shape {tuple(x.shape)}")
    if acc.dim() != 2 or acc.shape[0] != acc.shape[1] or acc.shape[0] != x.shape[1]:
        raise ValueError(f"gram_acc_triton: acc must be [{x.shape[1]}, {x.shape[1]}], got {tuple(acc.shape)}")
    if acc.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"gram_acc_triton: acc must be float32 or float64, got {acc.dtype}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"gram_acc_triton: x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.device != acc.device:
        raise ValueError(f"gram_acc_triton: x is on {x.device} but acc is on {acc.device}")
    if x.device.type == "cpu" and not interpreted():
        raise RuntimeError("gram_acc_triton: CPU tensors run only under the Triton interpreter; set "
                           "TRITON_INTERPRET=1 before obdk.kernels.gram is first imported")
    if x.device.type not in ("cpu", "cuda"):
        raise ValueError(f"gram_acc_triton: unsupported device {x.device}")
    T, n = x.shape
    if T == 0 or n == 0:
        return None

    cfg = config or pick_config(n, T, x.dtype, x.device)
    block, block_k = cfg.block, cfg.block_k
    tiles = _num_tiles(n, block)
    # token chunks are whole BLOCK_K steps; recompute the split so none is empty
    per_split = triton.cdiv(triton.cdiv(T, max(1, cfg.split)), block_k) * block_k
    split = triton.cdiv(T, per_split)
    if split == 1:
        per_split = T
    ws = torch.empty((split, tiles, block, block) if split > 1 else (1,), device=x.device, dtype=torch.float32)
    interp = interpreted()
    # No FMA contraction: the direct and the mirrored update must round identically (exact symmetry).
    launch = {} if interp else dict(enable_fp_fusion=False)
    with torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext():
        _gram_tile_kernel[(tiles, split)](
            x, acc, ws, T, n, x.stride(0), x.stride(1), acc.stride(0), acc.stride(1),
            float(alpha), per_split, tiles,
            BLOCK=block, BLOCK_K=block_k, PRECISION="ieee",
            UPCAST=interp and x.dtype != torch.float32, SPLIT=split > 1,
            ACC_F64=acc.dtype == torch.float64, INTERP=interp,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch)
        if split > 1:
            _gram_reduce_kernel[(tiles,)](
                ws, acc, n, acc.stride(0), acc.stride(1), float(alpha), tiles, split,
                BLOCK=block, ACC_F64=acc.dtype == torch.float64, INTERP=interp,
                num_warps=8 if block >= 128 else 4, num_stages=1, **launch)
    return None

