"""Triton kernels for the two-factor low-rank linear ``y = (x aᵀ) bᵀ + bias``.

``x`` [..., n] (leading dims flattened to M rows), ``a`` [r, n], ``b`` [m, r],
``bias`` [m] (any float dtype, added in fp32); output [..., m] in ``x.dtype``.
``x``, ``a`` and ``b`` share one dtype (fp16, bf16 or fp32). The launchers are
registered as the ``triton`` backend of ``obdk::lowrank_linear`` (obdk/ops.py)
and serve the packed q/k/v, gate/up modules of :mod:`obdk.nn`.

Two paths, chosen by M (``DECODE_MAX_M``):

* **decode** (M ≤ 16): the layer is a few µs of streaming the factors, so the
  whole GPU must stream them. ``_down_splitn_kernel`` splits the shrink
  ``t = x aᵀ`` over n (grid: r-blocks × n-splits, each program an fp32 partial
  into a workspace [splits, M, r]); the *last* program to finish an r-block
  (an acq_rel atomic counter per r-block, reset by that program) sums the
  splits in fixed split order, so the result is deterministic. ``t`` stays
  fp32; the expand ``y = t bᵀ + bias`` (``_nt_kernel``) multiplies the fp32
  ``t`` by ``b`` upcast to fp32 with ``tf32x3`` dots (``b`` is exact in tf32,
  the split of ``t`` keeps ~fp32 precision; tensor-core work is free at this
  arithmetic intensity), or exact-fp32 ``ieee`` dots for fp32 inputs.
  Two launches per layer.
* **prefill** (M > 16): two tiled GEMMs with the same ``_nt_kernel``
  (``C = A Bᵀ``, grouped-M program order for L2 reuse): GEMM 1 accumulates in
  fp32 and writes ``t`` **in x.dtype** (one rounding, as PyTorch's two-matmul
  and vLLM's LoRA expand do; it halves the intermediate's traffic and keeps
  GEMM 2 on 16-bit tensor cores), GEMM 2 adds the bias in its epilogue.

The same ``_nt_kernel`` is *grouped* (``G`` members): the block-diagonal expand
of packed factors (``t`` = x [a_1; a_2; …]ᵀ, y_g = t[:, r_g-slice] b_gᵀ) in one
launch, reading per-member (m_g, column offset, t offset, flat-b offset, r_g)
from a small int64 table.

fp32 inputs use ``ieee`` dots (PyTorch does not use TF32 for matmuls by default).
On CUDA, configs are autotuned per shape (autotune keys: n, r / m, r and a
power-of-two bucket of M at prefill). Under ``TRITON_INTERPRET=1`` (CPU tensors,
for tests) fixed small configs are used.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

#: M (flattened rows) at or below which the split-n decode path runs.
DECODE_MAX_M = 16
_DECODE_BLOCK_M = 16            # tl.dot needs ≥ 16 rows; rows ≥ M are masked
_MIN_SPLIT_K = 128              # smallest SPLIT_K of any config: sizes the workspace
_MIN_BLOCK_R = 16               # smallest BLOCK_R of any config: sizes the counters

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# The kernels use only builtins of triton.language (no @jit helpers such as tl.zeros or
# tl.cdiv), so they also interpret when Triton itself was imported without TRITON_INTERPRET.
_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)

# --------------------------------------------------------------------------- kernels


@triton.jit
def _down_splitn_kernel(X, A, WS, T, CNT, M, N_IN, R, stride_xm, stride_ar,
                        PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """t[M, R] (fp32) = x[M, N_IN] · a[R, N_IN]ᵀ, split over N_IN; fixed-order split reduction."""
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    r_mask = offs_r < R
    k_start = pid_s * SPLIT_K
    x_ptrs = X + offs_m[:, None] * stride_xm + (k_start + offs_k)[None, :]
    a_ptrs = A + offs_r[:, None] * stride_ar + (k_start + offs_k)[None, :]
    acc = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    for kk in range(0, SPLIT_K, BLOCK_K):
        k_mask = (k_start + kk + offs_k) < N_IN
        xt = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        at = tl.load(a_ptrs, mask=r_mask[:, None] & k_mask[None, :], other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
            at = at.to(tl.float32)
        acc = tl.dot(xt, tl.trans(at), acc, input_precision=PREC)
        x_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
    out_mask = m_mask[:, None] & r_mask[None, :]
    tile = offs_m[:, None] * R + offs_r[None, :]
    if n_split == 1:
        tl.store(T + tile, acc, mask=out_mask)
    else:
        tl.store(WS + pid_s * M * R + tile, acc, mask=out_mask)
        # Make every thread's partial visible before the counter is bumped (release),
        # and read the other programs' partials after it (acquire, L2 loads).
        tl.debug_barrier()
        done = tl.atomic_add(CNT + pid_r, 1, sem="acq_rel", scope="gpu")
        if done == n_split - 1:
            tot = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
            for s in range(0, n_split):
                tot += tl.load(WS + s * M * R + tile, mask=out_mask, other=0.0, cache_modifier=".cg")
            tl.store(T + tile, tot, mask=out_mask)
            tl.atomic_xchg(CNT + pid_r, 0, sem="relaxed", scope="gpu")


@triton.jit
def _nt_kernel(A, B, C, BIAS, META, M, N, K, stride_am, stride_bn, stride_cm, M_BUCKET,
               G: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST_A: tl.constexpr, UPCAST_B: tl.constexpr, PREC: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C[M, N] = A[M, K] · B[N, K]ᵀ (+ bias), fp32 accumulation, C in its own dtype.

    G > 1: grouped/block-diagonal. Member g owns output columns [col0_g, col0_g + n_g),
    reads A columns [k0_g, k0_g + k_g) and B rows from the flat buffer at b_off_g with
    row stride k_g; META is int64 [G, 5] = (n_g, col0_g, k0_g, b_off_g, k_g).
    """
    pid = tl.program_id(0)
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    if G == 1:
        num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    else:
        num_pid_n = 0
        for g in tl.static_range(G):
            num_pid_n += (tl.load(META + 5 * g).to(tl.int32) + BLOCK_N - 1) // BLOCK_N
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % width) % size_m)
    pid_n = (pid % width) // size_m

    if G == 1:
        n_g = N
        col0 = 0
        k0 = 0
        b_off = 0
        k_g = K
        ldb = stride_bn
        local_n = pid_n
    else:
        zero = pid_n * 0
        n_g = zero
        col0 = zero
        k0 = zero
        k_g = zero
        local_n = zero
        b_off = zero.to(tl.int64)
        cum = zero
        for g in tl.static_range(G):
            ng = tl.load(META + 5 * g).to(tl.int32)
            nb = (ng + BLOCK_N - 1) // BLOCK_N
            hit = (pid_n >= cum) & (pid_n < cum + nb)
            n_g = tl.where(hit, ng, n_g)
            col0 = tl.where(hit, tl.load(META + 5 * g + 1).to(tl.int32), col0)
            k0 = tl.where(hit, tl.load(META + 5 * g + 2).to(tl.int32), k0)
            b_off = tl.where(hit, tl.load(META + 5 * g + 3), b_off)
            k_g = tl.where(hit, tl.load(META + 5 * g + 4).to(tl.int32), k_g)
            local_n = tl.where(hit, pid_n - cum, local_n)
            cum += nb
        ldb = k_g

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = local_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < n_g
    rows = offs_m.to(tl.int64)
    a_ptrs = A + rows[:, None] * stride_am + (k0 + offs_k)[None, :]
    b_ptrs = B + b_off + offs_n[:, None] * ldb + offs_k[None, :]
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for kk in range(0, k_g, BLOCK_K):
        k_mask = (kk + offs_k) < k_g
        at = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        bt = tl.load(b_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        if UPCAST_A:
            at = at.to(tl.float32)
        if UPCAST_B:
            bt = bt.to(tl.float32)
        acc = tl.dot(at, tl.trans(bt), acc, input_precision=PREC)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if HAS_BIAS:
        bias = tl.load(BIAS + col0 + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc += bias[None, :]
    c_ptrs = C + rows[:, None] * stride_cm + (col0 + offs_n)[None, :]
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# --------------------------------------------------------------------------- configs


def _cfg(num_warps: int = 4, num_stages: int = 3, **kw) -> triton.Config:
    return triton.Config(kw, num_warps=num_warps, num_stages=num_stages)


_DOWN_CONFIGS = [
    _cfg(BLOCK_R=32, BLOCK_K=128, SPLIT_K=512),
    _cfg(BLOCK_R=64, BLOCK_K=128, SPLIT_K=512),
    _cfg(BLOCK_R=64, BLOCK_K=128, SPLIT_K=1024),
    _cfg(BLOCK_R=128, BLOCK_K=128, SPLIT_K=1024),
    _cfg(BLOCK_R=64, BLOCK_K=256, SPLIT_K=1024, num_stages=2),
    _cfg(BLOCK_R=32, BLOCK_K=256, SPLIT_K=2048),
    _cfg(BLOCK_R=64, BLOCK_K=64, SPLIT_K=256, num_stages=4),
    _cfg(BLOCK_R=16, BLOCK_K=128, SPLIT_K=256, num_stages=4),
    _cfg(BLOCK_R=128, BLOCK_K=64, SPLIT_K=512, num_warps=8, num_stages=4),
    _cfg(BLOCK_R=32, BLOCK_K=128, SPLIT_K=128, num_stages=2),
]
# sm_90a resources of every config: benchmarks/results/triton_sm90_resources.csv (python -m
# benchmarks.triton_sm90_resources). No BLOCK_K=256 tile: with B upcast for the tf32x3 dot they
# spilled at 16-bit, 4 or 8 warps alike (16x16x256: 712-840 B of stack, 16x32x256: 192-272 B;
# triton 3.9); 16x64x128 runs with 8 warps (with 4 it spilled 24 B).
_EXPAND_DECODE_CONFIGS = [
    _cfg(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=1, num_warps=w, num_stages=s)
    for bn, bk, w, s in [(16, 128, 4, 4), (32, 128, 4, 4), (64, 128, 8, 3), (64, 64, 4, 4), (128, 64, 8, 3)]
]
_PREFILL_CONFIGS = [
    _cfg(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4),
                             (128, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                             (64, 64, 64, 4, 4), (128, 128, 32, 4, 4), (64, 64, 32, 4, 3)]
]
# Fixed configs for the interpreter: small tiles, and a split size that exercises the
# multi-split reduction already at n > 128.
_INTERP_DOWN = dict(BLOCK_R=32, BLOCK_K=64, SPLIT_K=128)
_INTERP_DECODE = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1)
_INTERP_PREFILL = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=4)

assert min(c.kwargs["SPLIT_K"] for c in _DOWN_CONFIGS) >= _MIN_SPLIT_K and _INTERP_DOWN["SPLIT_K"] >= _MIN_SPLIT_K
assert min(c.kwargs["BLOCK_R"] for c in _DOWN_CONFIGS) >= _MIN_BLOCK_R

# Configs of _nt_kernel that spill registers on sm_90a in one kind of call (the resource table
# benchmarks/results/triton_sm90_resources.csv, triton 3.6 and 3.9): the autotuner never tries them
# there (early_config_prune). Keys (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). "fp32": ieee
# FMA dots, whose fp32 operands and accumulator tile live in registers; "grouped": G > 1, whose B
# offsets and row strides come from META at run time, so its loads are not vectorised and take more
# registers (16-bit; "fp32-grouped" both); "16bit-unaligned": G = 1 with K or a row stride not a
# multiple of 16 (a rank that is a multiple of 8 only). Aligned 16-bit calls spill in no config.
_SPILLING = {
    "16bit-unaligned": {(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                        (128, 128, 32, 4, 4)},
    "fp32": {(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 64, 64, 4, 4),
             (64, 64, 64, 4, 4), (128, 128, 32, 4, 4), (16, 64, 64, 4, 4)},
    "grouped": {(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 64, 64, 4, 4),
                (64, 128, 64, 4, 4), (128, 128, 32, 4, 4), (16, 16, 128, 4, 4), (16, 64, 128, 8, 3)},
    "fp32-grouped": {(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
                     (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (128, 128, 32, 4, 4)},
}


def _config_key(c) -> tuple:
    k = c.kwargs
    return (k["BLOCK_M"], k["BLOCK_N"], k["BLOCK_K"], c.num_warps, c.num_stages)


def _call_kind(G: int = 1, PREC: str = "tf32", aligned: bool = True, **_) -> str:
    fp32 = PREC == "ieee"
    if G > 1:
        return "fp32-grouped" if fp32 else "grouped"
    return "fp32" if fp32 else ("16bit" if aligned else "16bit-unaligned")


def _aligned(named_args) -> bool:
    """Whether the JIT sees K and the row strides as multiples of 16 (vectorised loads)."""
    return all(int((named_args or {}).get(k, 0)) % 16 == 0 for k in ("K", "stride_am", "stride_bn", "stride_cm"))


def _prune_spilling(configs, named_args=None, **kwargs):
    """The configs of ``configs`` that do not spill for this call's kind (at least one is kept)."""
    bad = _SPILLING.get(_call_kind(aligned=_aligned(named_args), **kwargs), set())
    return [c for c in configs if _config_key(c) not in bad] or list(configs[:1])


if _INTERPRET:
    _down = _nt_decode = _nt_prefill = None
else:
    _prune = {"early_config_prune": _prune_spilling}
    _down = triton.autotune(_DOWN_CONFIGS, key=["N_IN", "R", "PREC", "UPCAST"])(_down_splitn_kernel)
    _nt_decode = triton.autotune(_EXPAND_DECODE_CONFIGS, key=["N", "K", "G", "PREC", "UPCAST_A", "UPCAST_B"],
                                 prune_configs_by=_prune)(_nt_kernel)
    _nt_prefill = triton.autotune(_PREFILL_CONFIGS, key=["M_BUCKET", "N", "K", "G", "PREC", "UPCAST_A", "UPCAST_B"],
                                  prune_configs_by=_prune)(_nt_kernel)


# --------------------------------------------------------------------------- workspace

_COUNTERS: dict = {}
_COUNTERS_LOCK = threading.Lock()


def _counters(device: torch.device, n: int) -> Tensor:
    """Zeroed int32 counters, cached per (device, stream); the kernel resets what it uses."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    key = (str(device), stream)
    with _COUNTERS_LOCK:
        buf = _COUNTERS.get(key)
        if buf is None or buf.numel() < n:
            buf = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
            _COUNTERS[key] = buf
    return buf


# --------------------------------------------------------------------------- launchers


def interpreted() -> bool:
    """True when the kernels were defined under ``TRITON_INTERPRET=1`` (CPU tensors)."""
    return _INTERPRET


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _bucket(m: int) -> int:
    return 1 << max(0, (m - 1).bit_length())


def _rowmajor(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _shrink_decode(x2: Tensor, a: Tensor) -> Tensor:
    """t [M, R] fp32 = x2 aᵀ for M ≤ DECODE_MAX_M (split over n)."""
    M, n = x2.shape
    R = a.shape[0]
    t = torch.empty((M, R), dtype=torch.float32, device=x2.device)
    ws = torch.empty((triton.cdiv(n, _MIN_SPLIT_K), M, R), dtype=torch.float32, device=x2.device)
    cnt = _counters(x2.device, triton.cdiv(R, _MIN_BLOCK_R))
    args = (x2, a, ws, t, cnt, M, n, R, x2.stride(0), a.stride(0))
    prec = _prec(x2.dtype)
    upcast = _INTERPRET and x2.dtype == torch.bfloat16  # the interpreter mis-computes bf16 dots
    if upcast:
        prec = "ieee"
    if _INTERPRET:
        meta = _INTERP_DOWN
        grid = (triton.cdiv(R, meta["BLOCK_R"]), triton.cdiv(n, meta["SPLIT_K"]))
        _down_splitn_kernel[grid](*args, PREC=prec, UPCAST=upcast, BLOCK_M=_DECODE_BLOCK_M, **meta)
    else:
        grid = lambda META: (triton.cdiv(R, META["BLOCK_R"]), triton.cdiv(n, META["SPLIT_K"]))  # noqa: E731
        _down[grid](*args, PREC=prec, UPCAST=upcast, BLOCK_M=_DECODE_BLOCK_M)
    return t


def _nt(A: Tensor, B: Tensor, out: Tensor, bias: Optional[Tensor], meta: Optional[Tensor],
        outs: Sequence[int], K: int, decode: bool) -> Tensor:
    """out[M, Σouts] = A · Bᵀ (+bias), grouped over ``outs`` when ``meta`` is given."""
    M = A.shape[0]
    N = out.shape[1]
    G = 1 if meta is None else len(outs)
    upcast_b = A.dtype == torch.float32 and B.dtype != torch.float32
    upcast_a = _INTERPRET and A.dtype == torch.bfloat16  # the interpreter mis-computes bf16 dots
    upcast_b = upcast_b or upcast_a
    prec = "tf32x3" if upcast_b else _prec(A.dtype)
    if _INTERPRET and upcast_b:
        prec = "ieee"  # the interpreter computes every dot in fp32 anyway
    args = (A, B, out, bias if bias is not None else out, meta if meta is not None else out,
            M, N, K, A.stride(0), B.stride(0) if B.dim() == 2 else 0, out.stride(0), _bucket(M))
    kw = dict(G=G, HAS_BIAS=bias is not None, UPCAST_A=upcast_a, UPCAST_B=upcast_b, PREC=prec)

    def grid(META):
        return (triton.cdiv(M, META["BLOCK_M"]) * sum(triton.cdiv(o, META["BLOCK_N"]) for o in outs),)

    if _INTERPRET:
        cfg = _INTERP_DECODE if decode else _INTERP_PREFILL
        _nt_kernel[grid(cfg)](*args, **kw, **cfg)
    else:
        (_nt_decode if decode else _nt_prefill)[grid](*args, **kw)
    return out


def _check(x: Tensor, *ws: Tensor) -> None:
    if x.dtype not in _SUPPORTED:
        raise TypeError(f"obdk triton lowrank: dtype {x.dtype} not supported (fp16, bf16, fp32)")
    for w in ws:
        if w.dtype != x.dtype:
            raise TypeError(f"obdk triton lowrank: factors must have x's dtype {x.dtype}, got {w.dtype}")
        if w.device != x.device:
            raise ValueError(f"obdk triton lowrank: tensors on {x.device} and {w.device}")
    if x.device.type == "cpu" and not _INTERPRET:
        raise RuntimeError("obdk triton lowrank: CPU tensors need TRITON_INTERPRET=1 set before import")


def _forward(x: Tensor, a: Tensor, b: Tensor, bias: Optional[Tensor], meta: Optional[Tensor],
             outs: Sequence[int]) -> Tensor:
    n = x.shape[-1]
    R = a.shape[0]
    N = sum(outs)
    x2 = _rowmajor(x.reshape(-1, n))
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return y.view(*x.shape[:-1], N)
    if R == 0:  # degenerate rank: only the bias survives
        y.copy_(bias.to(x.dtype).expand(M, N) if bias is not None else torch.zeros_like(y))
        return y.view(*x.shape[:-1], N)
    if bias is not None:
        bias = bias.contiguous()
    dev = x2.device.type == "cuda"
    with torch.cuda.device(x2.device) if dev else contextlib.nullcontext():
        if M <= DECODE_MAX_M:
            t = _shrink_decode(x2, a)
            _nt(t, b, y, bias, meta, outs, R, decode=True)
        else:
            t = torch.empty((M, R), dtype=x.dtype, device=x.device)
            _nt(x2, a, t, None, None, (R,), n, decode=False)
            _nt(t, b, y, bias, meta, outs, R, decode=False)
    return y.view(*x.shape[:-1], N)


def lowrank_linear_triton(x: Tensor, a: Tensor, b: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``(x aᵀ) bᵀ + bias`` with Triton. ``x`` [..., n], ``a`` [r, n], ``b`` [m, r] → [..., m] (x.dtype)."""
    a, b = _rowmajor(a), _rowmajor(b)
    _check(x, a, b)
    return _forward(x, a, b, bias, None, (b.shape[0],))


def lowrank_grouped_triton(x: Tensor, a_cat: Tensor, b_flat: Tensor, meta: Tensor, outs: Sequence[int],
                           bias_cat: Optional[Tensor] = None) -> Tensor:
    """Packed factors that share ``x``: ``y[..., Σm] = cat_g((x a_catᵀ)[:, r_g-slice] b_gᵀ) + bias_cat``.

    ``a_cat`` [Σr, n] (member a's stacked), ``b_flat`` 1-D: the row-major b_g [m_g, r_g]
    concatenated, ``meta`` the int64 [G, 5] table (m_g, col0_g, t_col0_g, b_off_g, r_g) on x's
    device (``obdk.nn._grouped_meta``), ``outs`` = (m_g).
    One shrink launch over the concatenated rank, one grouped expand launch.
    """
    a_cat = _rowmajor(a_cat)
    _check(x, a_cat, b_flat)
    if len(outs) == 1:
        return _forward(x, a_cat, b_flat.view(outs[0], a_cat.shape[0]), bias_cat, None, tuple(outs))
    return _forward(x, a_cat, b_flat, bias_cat, meta, tuple(outs))
