"""Closed-form rank-r factorisations ``W ≈ b @ a`` under the K-FAC loss (DESIGN.md §1).

``W`` [m, n] (out × in), ``C_x`` [n, n] input covariance, ``C_g`` [m, m] output-gradient
covariance. The loss increase of ``W → W'`` is ``½ tr(C_g ΔW C_x ΔWᵀ) = ½‖R_gᵀ ΔW S_x‖²_F``.
Methods: ``"svd"`` (``C_x = C_g = I``), ``"svd-llm"`` (``C_g = I``), ``"obd"`` (both sides).

Solvers (both give the optimum of the damped objective):

* ``"eig"`` (default), the exact eigen form: work on the smaller side p = min(m, n) (the
  transposed problem when m > n). With ``C_p`` the p×p covariance (``C_g`` for m ≤ n, ``C_x``
  otherwise; I for SVD / the SVD-LLM output side) and ``C_q`` the other one: ``C_p = L Lᵀ``
  (Cholesky), ``T = Lᵀ W``, ``K = T C_q Tᵀ = U Λ Uᵀ`` (p×p), ``b = L⁻ᵀ U_r`` (triangular solve),
  ``a = U_rᵀ T``. ``C_q`` is never rooted nor inverted (a singular ``C_x`` is fine for m ≤ n), no
  division by λ, and every component is kept. If ``C_p`` is singular at the requested damping
  (no Cholesky factor), an eigen root ``R Rᵀ = C_p`` replaces ``L`` instead of more damping:
  ``b = W C_q Tᵀ U_r Λ_r^{-½}``, ``a = Λ_r^{-½} U_rᵀ T`` with ``T = Rᵀ W`` (no inverse of
  ``R``); components with ``λ ≤ rtol·λ_1`` (below the numerical rank) then contribute nothing,
  never dividing by ~0. Both are the ``C``-orthogonal projection of ``W`` onto the optimal space.
* ``"cholesky"``: ``S_x``, ``R_g`` Cholesky factors of the damped covariances, SVD of
  ``M = R_gᵀ W S_x``, coloured back by triangular solves.

The eigenvalues ``λ`` (descending) are in loss units: dropping component i costs ``λ_i/2``.
A :class:`Spectrum` holds the full decomposition; :meth:`Spectrum.truncate` cuts it to any
rank by slicing, so every ratio comes from one decomposition.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import math
import numbers
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..allocate.budget import break_even as break_even_rank  # (the budget rule's; public here too)
from ..errors import DataError
from .roots import (
    _escalate,
    add_damping,
    all_finite,
    damped_cholesky,
    damped_eigen_root,
    eigh_desc,
    normalize_cov,
    try_cholesky,
)

logger = logging.getLogger(__name__)

#: The sub-stages of a decomposition timed by :func:`phase_clock`.
PHASES = ("roots", "products", "eigen", "solves")
_CLOCK: contextvars.ContextVar[Optional[tuple[dict, threading.Lock]]] = contextvars.ContextVar("obdk_phase_clock",
                                                                                                 default=None)


@contextlib.contextmanager
def phase_clock():
    """Time the sub-stages of every decomposition run inside this block (and in threads started
    with a copy of its context, ``contextvars.copy_context().run``). Yields a dict
    ``{phase: seconds}`` over :data:`PHASES`: ``roots`` (covariance preparation, Cholesky or
    eigen roots), ``products`` (the whitening products ``T = LᵀW`` and ``K = T C Tᵀ``), ``eigen``
    (the eigen-decomposition or SVD), ``solves`` (triangular solves and assembling the factors).
    Times are summed over problems, so with parallel workers they add up to more than the wall
    time. On CUDA each phase synchronises the device at its end so the time is its own.
    """
    acc = {k: 0.0 for k in PHASES}
    token = _CLOCK.set((acc, threading.Lock()))
    try:
        yield acc
    finally:
        _CLOCK.reset(token)


@contextlib.contextmanager
def _phase(name: str, dev: torch.device):
    clock = _CLOCK.get()
    if clock is None:
        yield
        return
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        dt = time.perf_counter() - t0
        acc, lock = clock
        with lock:
            acc[name] += dt


METHODS = ("svd", "svd-llm", "obd")
SOLVERS = ("eig", "cholesky")
_COMPUTE_DTYPES = (torch.float32, torch.float64)


def damp_covariance(c: Tensor, alpha: float) -> Tensor:
    """Relative damping ``C + α·mean(diag C)·I`` as obdk applies it. ``c`` [k, k] → [k, k].

    Where ``mean(diag C) ≤ 0`` (an all-zero covariance) the scale is 1. Use it to evaluate the
    loss a factorisation actually minimised (``Factorization.damping`` gives α per side).
    """
    s = torch.diagonal(c).mean()
    s = s if bool(s > 0) else torch.ones((), dtype=c.dtype, device=c.device)
    return c + alpha * s * torch.eye(c.shape[-1], dtype=c.dtype, device=c.device)


def kfac_loss(delta: Tensor, cx: Optional[Tensor] = None, cg: Optional[Tensor] = None) -> float:
    """Predicted loss increase ``½ tr(C_g Δ C_x Δᵀ)`` of a weight change, in fp64.

    ``delta`` [m, n]; ``cx`` [n, n] or None (identity); ``cg`` [m, m] or None (identity).
    """
    d = delta.to(torch.float64)
    left = d if cg is None else cg.to(d) @ d
    right = d if cx is None else d @ cx.to(d)
    return 0.5 * float((left * right).sum())


# --------------------------------------------------------------------------- results


@dataclass
class Factorization:
    """A rank-``rank`` factorisation ``b @ a ≈ weight`` (or the dense weight, kept).

    ``b`` [m, r], ``a`` [r, n] in the weight's dtype and device, or both None when ``dense``
    (the rank reached break-even ``mn/(m+n)``); then ``weight`` is the original [m, n] tensor.
    ``spectrum`` [min(m, n)] fp64: eigenvalues λ of the whitened problem, descending, in loss
    units. ``predicted_loss = ½ Σ_{dropped} λ_i`` (0 when dense). ``damping``: relative damping
    actually used, ``{"cx": α_x, "cg": α_g}`` (0.0 for a side the method does not use).
    ``numerical_rank``: number of λ above the relative tolerance.
    """

    b: Optional[Tensor] = field(repr=False)
    a: Optional[Tensor] = field(repr=False)
    weight: Optional[Tensor] = field(repr=False)
    rank: int
    dense: bool
    spectrum: Tensor = field(repr=False)
    predicted_loss: float
    damping: Dict[str, float]
    method: str
    solver: str
    numerical_rank: int

    def to_dense(self) -> Tensor:
        """The approximated weight [m, n]: ``b @ a``, or ``weight`` when dense."""
        return self.weight if self.dense else self.b @ self.a

    @property
    def num_params(self) -> int:
        """Parameters stored: ``r(m+n)``, or ``mn`` when dense."""
        return self.weight.numel() if self.dense else self.b.numel() + self.a.numel()


@dataclass
class Spectrum:
    """The full decomposition of one weight, computed once; cut to any rank with :meth:`truncate`.

    ``eigenvalues`` [k] fp64 (k = min(m, n)), descending, ≥ 0, in loss units.
    ``factor_b`` [m, k] and ``factor_a`` [k, n] (compute dtype, weight's device): the ordered
    components, balanced (column i of ``factor_b`` and row i of ``factor_a`` have equal norms);
    ``factor_b[:, :r] @ factor_a[:r]`` is the optimal rank-r approximation. ``weight`` is the
    original tensor (returned when a truncation stays dense). ``kept``: how many leading
    components the factors carry (all, except where the ``"eig"`` solver had to divide by λ:
    then the numerical rank); ``numerical_rank``: number of ``λ > rtol·λ_1``.
    """

    eigenvalues: Tensor = field(repr=False)
    factor_b: Tensor = field(repr=False)
    factor_a: Tensor = field(repr=False)
    weight: Tensor = field(repr=False)
    method: str
    solver: str
    damping: Dict[str, float]
    numerical_rank: int
    rtol: float
    kept: int = field(repr=False)  # components carried by the factors (numerical rank for "eig")

    @property
    def shape(self) -> Tuple[int, int]:
        """``(m, n)`` of the weight."""
        return tuple(self.weight.shape)

    @property
    def max_rank(self) -> int:
        """``min(m, n)``."""
        return self.eigenvalues.shape[0]

    def tail_loss(self, rank: int) -> float:
        """Predicted loss increase ``½ Σ_{i > rank} λ_i`` of keeping the top ``rank`` components.

        ``rank`` ≥ 0 (0 drops everything; ≥ ``max_rank`` keeps everything). Components the
        factors do not carry (beyond ``kept``) count as dropped.
        """
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 0:
            raise DataError(f"Spectrum.tail_loss: rank must be a non-negative int, got {rank!r}")
        r = min(int(rank), self.kept)
        return 0.5 * float(self.eigenvalues[r:].sum())

    def truncate(self, rank: int, rank_multiple: int = 1, *, keep_dense_at_break_even: bool = True) -> Factorization:
        """Rank-``rank`` factorisation by slicing: ``b`` [m, r], ``a`` [r, n] in the weight's dtype.

        ``rank`` is rounded to the nearest multiple of ``rank_multiple`` (at least one multiple);
        if the result is ≥ ``mn/(m+n)`` and ``keep_dense_at_break_even``, the dense weight is
        returned (``dense=True``). A rank above ``min(m, n)`` is clamped to ``min(m, n)``.
        """
        m, n = self.shape
        r, dense = _resolve_rank(rank, rank_multiple, m, n, keep_dense_at_break_even, "Spectrum.truncate")
        common = dict(spectrum=self.eigenvalues, damping=dict(self.damping), method=self.method,
                      solver=self.solver, numerical_rank=self.numerical_rank)
        if dense:
            return Factorization(b=None, a=None, weight=self.weight, rank=r, dense=True, predicted_loss=0.0, **common)
        if r > self.factor_b.shape[-1]:
            raise DataError(f"Spectrum.truncate: rank {r} needs {r} components and this spectrum's factors carry "
                            f"{self.factor_b.shape[-1]} (compacted to the largest rank that saves parameters, "
                            f"Spectrum.compact); a rank at or above break-even {break_even_rank(m, n):.1f} stays dense")
        dt = self.weight.dtype
        b = self.factor_b[:, :r].to(dt).contiguous()
        a = self.factor_a[:r].to(dt).contiguous()
        return Factorization(b=b, a=a, weight=None, rank=r, dense=False, predicted_loss=self.tail_loss(r), **common)

    def compact(self, max_rank: int, dtype: Optional[torch.dtype] = None) -> "Spectrum":
        """A copy whose factors carry only the leading ``max_rank`` components (``factor_b`` [m, R], ``factor_a``
        [R, n], R = min(``max_rank``, carried)), cast to ``dtype`` when that is narrower than theirs.

        For a store of spectra that only factored ranks ≤ ``max_rank`` will be cut from (a streamed plan keeps
        every target's spectrum until the allocation; no allocator factors a rank at or above break-even, so
        ``max_rank = max_factored_rank(m, n)`` loses nothing). :meth:`truncate` at any rank ≤ R gives the same
        tensors as before when ``dtype`` is the weight's (truncate casts to it anyway); above R it raises. The
        eigenvalues stay whole (the allocation's costs, :meth:`tail_loss`). Llama-7B's fp32 spectra at full rank
        in fp64 hold 2.6 GB of factors per decoder layer; compacted to break-even in fp32, 0.81 GB.
        """
        if not _is_int(max_rank) or max_rank < 1:
            raise DataError(f"Spectrum.compact: max_rank must be a positive int, got {max_rank!r}")
        R = min(int(max_rank), self.factor_b.shape[-1])
        to = dtype if dtype is not None and dtype.itemsize < self.factor_b.dtype.itemsize else self.factor_b.dtype
        b, a = self.factor_b[:, :R], self.factor_a[:R]
        return dataclasses.replace(self, factor_b=b.to(to, copy=True).contiguous(),
                                   factor_a=a.to(to, copy=True).contiguous(), kept=min(self.kept, R))


# --------------------------------------------------------------------------- validation


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _resolve_rank(rank, rank_multiple, m: int, n: int, keep_dense: bool, fn: str) -> Tuple[int, bool]:
    _check_rank(rank, rank_multiple, fn)
    q = int(rank_multiple)
    r = q * max(1, math.floor(int(rank) / q + 0.5))
    dense = bool(keep_dense) and r >= break_even_rank(m, n)
    if not dense and r > min(m, n):
        logger.debug("%s: rank %d clamped to min(m, n) = %d", fn, r, min(m, n))
        r = min(m, n)
    return r, dense


def _check_rank(rank, rank_multiple, fn: str) -> None:
    if not _is_int(rank) or rank <= 0:
        raise DataError(f"{fn}: rank must be a positive int, got {rank!r}")
    if not _is_int(rank_multiple) or rank_multiple <= 0:
        raise DataError(f"{fn}: rank_multiple must be a positive int, got {rank_multiple!r}")


def _check_device(fn: str, device) -> Optional[torch.device]:
    if device is None:
        return None
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DataError(f"{fn}: device must be None, a torch.device or a device string like 'cuda:0', "
                         f"got {device!r} ({exc})") from None


def _check_options(fn, method, solver, compute_dtype, damping, damping_max, damping_growth, rtol) -> None:
    if method not in METHODS:
        raise DataError(f"{fn}: method must be one of {METHODS}, got {method!r}")
    if solver not in SOLVERS:
        raise DataError(f"{fn}: solver must be one of {SOLVERS}, got {solver!r}")
    if compute_dtype not in _COMPUTE_DTYPES:
        raise DataError(f"{fn}: compute_dtype must be torch.float64 or torch.float32, got {compute_dtype!r}")
    for name, v in (("damping", damping), ("damping_max", damping_max), ("damping_growth", damping_growth)):
        if not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise DataError(f"{fn}: {name} must be a finite non-negative number, got {v!r}")
    if damping > damping_max:
        raise DataError(f"{fn}: damping ({damping:g}) must not exceed damping_max ({damping_max:g})")
    if damping_growth <= 1:
        raise DataError(f"{fn}: damping_growth must be > 1, got {damping_growth!r}")
    if rtol is not None and (not isinstance(rtol, numbers.Real) or not math.isfinite(rtol) or not 0 <= rtol < 1):
        raise DataError(f"{fn}: rtol must be None or a number in [0, 1), got {rtol!r}")


def _check_weight(w, fn: str, name: str, batched: bool) -> None:
    if not isinstance(w, Tensor):
        raise DataError(f"{fn}: {name} must be a torch.Tensor, got {type(w).__name__}")
    want = 3 if batched else 2
    shape = "[B, m, n]" if batched else "[m, n] (out × in)"
    if w.dim() != want or 0 in w.shape:
        raise DataError(f"{fn}: {name} must be a non-empty {want}-D tensor {shape}, got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise DataError(f"{fn}: {name} must be floating point, got {w.dtype}")
    if not all_finite(w):
        raise DataError(f"{fn}: {name} contains non-finite values (NaN or inf)")


def _check_cov(c, k: int, batch: Optional[int], fn: str, name: str, what: str) -> Tuple[Tensor, bool]:
    """Validate a covariance, returning it as [B', k, k] (B' = 1 when shared) and whether it is
    exactly symmetric (then :func:`_prepare_cov` need not test nor symmetrise it again)."""
    if not isinstance(c, Tensor):
        raise DataError(f"{fn}: {name} must be a torch.Tensor [{k}, {k}] ({what}), got {type(c).__name__}")
    ok_shapes = [(k, k)] + ([(batch, k, k)] if batch is not None else [])
    if tuple(c.shape) not in ok_shapes:
        want = " or ".join(str(list(s)) for s in ok_shapes)
        raise DataError(f"{fn}: {name} must be a square {want} covariance ({what}), got shape {tuple(c.shape)}")
    if not c.is_floating_point():
        raise DataError(f"{fn}: {name} must be floating point, got {c.dtype}")
    if not all_finite(c):
        raise DataError(f"{fn}: {name} contains non-finite values (NaN or inf)")
    c3 = c if c.dim() == 3 else c.unsqueeze(0)
    exact = torch.equal(c3, c3.mT)
    if not exact:  # obdk's own statistics are exactly symmetric: no temporaries then
        c32 = c3.to(torch.float64 if c3.dtype == torch.float64 else torch.float32)
        scale = c32.abs().amax((-2, -1))
        asym = (c32 - c32.mT).abs().amax((-2, -1))
        tol = max(1e-3, 4 * torch.finfo(c.dtype).eps)
        if bool((asym > tol * scale).any()):
            worst = float((asym / scale.clamp_min(torch.finfo(c32.dtype).tiny)).max())
            raise DataError(f"{fn}: {name} must be a symmetric covariance; max |C - Cᵀ| / max |C| = {worst:.3g} "
                             f"exceeds tolerance {tol:g}")
    if bool((torch.diagonal(c3, dim1=-2, dim2=-1) < 0).any()):
        raise DataError(f"{fn}: {name} must be positive semi-definite but has negative diagonal entries")
    return c3, exact


# --------------------------------------------------------------------------- core


def _finite(*ts: Tensor) -> bool:
    return all(all_finite(t) for t in ts)


def _default_rtol(m: int, n: int, dtype: torch.dtype) -> float:
    return max(m, n) * torch.finfo(dtype).eps


def _gram(T: Tensor, C: Optional[Tensor], alpha: List[float]) -> Tensor:
    """``T (C + αI) Tᵀ`` (or ``T Tᵀ`` when ``C`` is None). ``T`` [B, p, q], ``C`` [1|B, q, q] → [B, p, p].

    Formed as ``(T C + α T) Tᵀ``: the damping is added to the [p, q] product, never by copying
    the (larger) [q, q] covariance.
    """
    if C is None:
        return T @ T.mT
    TC = T @ C
    if len(set(alpha)) == 1:
        if alpha[0] != 0.0:
            TC.add_(T, alpha=alpha[0])
    else:
        TC.add_(T * torch.tensor(alpha, dtype=T.dtype, device=T.device)[:, None, None])
    return TC @ T.mT


def _prepare_cov(c: Tensor, dev, cd: torch.dtype, exact: bool) -> Tuple[Tensor, Tensor]:
    """``c`` [B, k, k] (validated) → (symmetric ``c / mean(diag c)`` in ``cd`` on ``dev``, scales [B]).

    Equal to ``normalize_cov((c + cᵀ)/2)`` in ``cd``, with one [B, k, k] buffer instead of four:
    an exactly symmetric input (``exact``, from :func:`_check_cov`; obdk's own statistics always
    are) skips the symmetrisation, and the scaling runs in place on the converted copy.
    """
    w = c.to(device=dev, dtype=cd, copy=True)
    if not exact:
        w = (w + w.mT).div_(2)
    return normalize_cov(w, inplace=True)


class _Escalator:
    """What to do when the final eigen/SVD step fails: damp one covariance more, or give up."""

    def __init__(self, fn: str, alpha: Optional[List[float]], name: str, esc: dict, cd: torch.dtype):
        self.fn, self.alpha, self.name, self.esc, self.cd = fn, alpha, name, esc, cd

    def __call__(self, reason: str) -> None:
        if self.alpha is None:
            raise DataError(f"{self.fn}: weight: {reason}; the weight is too ill-conditioned for "
                             f"compute_dtype={self.cd}")
        _escalate(self.alpha, list(range(len(self.alpha))), name=self.name, reason=reason, **self.esc)


def _eigh_retry(make_k, on_fail: _Escalator, reason: str) -> Tuple[Tensor, Tensor]:
    """Eigen-decomposition (descending) of ``make_k()`` [B, p, p], calling ``on_fail`` until it succeeds."""
    while True:
        try:
            k = make_k()
            with _phase("eigen", k.device):
                lam, vec = eigh_desc(k)
            if _finite(lam, vec):
                return lam, vec
        except (torch.linalg.LinAlgError, RuntimeError):
            pass
        on_fail(reason)


def _eig_form(W: Tensor, Cr: Optional[Tensor], ar: List[float], r_name: str, Cq: Optional[Tensor], aq: List[float],
              q_name: str, mask_of, esc: dict, fn: str):
    """The exact eigen form in the orientation ``W`` [B, p, q], p ≤ q.

    ``Cr`` [1|B, p, p] is whitened (or None: identity); ``Cq`` [1|B, q, q] enters only through
    ``K = T C_q Tᵀ`` (or None: identity). ``ar``/``aq`` are the relative dampings (lists, updated
    in place on escalation). Division-free when ``Cr + αI`` has a Cholesky factor ``L``
    (or ``Cr`` is None, ``L = I``): ``T = Lᵀ W``, ``K = U Λ Uᵀ``, ``b = L⁻ᵀ U``, ``a = Uᵀ T``; every
    component is kept (projecting onto more directions never raises the loss). Otherwise
    (``Cr`` singular at the requested damping) an eigen root ``R Rᵀ = Cr + αI``: ``T = Rᵀ W``,
    ``b = W C_q Tᵀ U Λ^{-½}``, ``a = Λ^{-½} Uᵀ T``, and components with ``λ ≤ rtol·λ_1`` are
    left out (never dividing by ~0). Returns (λ [B, p], b [B, p, p], a [B, p, q], kept [B]).
    """
    B, p, _ = W.shape
    on_fail = _Escalator(fn, aq if Cq is not None else (ar if Cr is not None else None),
                         q_name if Cq is not None else r_name, esc, W.dtype)
    reason = "eigen-decomposition of the whitened problem failed"
    dev = W.device
    with _phase("roots", dev):
        L = try_cholesky(Cr, ar) if Cr is not None else None
    if Cr is None or L is not None:
        state = {"L": L, "calls": 0}

        def make_k():
            if state["calls"] and Cr is not None and on_fail.alpha is ar:  # ar escalated: refactor
                with _phase("roots", dev):
                    state["L"], ar[:] = damped_cholesky(Cr, ar, name=r_name, **esc)
            state["calls"] += 1
            with _phase("products", dev):
                state["T"] = state["L"].mT @ W if Cr is not None else W
                return _gram(state["T"], Cq, aq)

        lam, U = _eigh_retry(make_k, on_fail, reason)
        with _phase("solves", dev):
            b = torch.linalg.solve_triangular(state["L"].mT, U, upper=True) if Cr is not None else U
            a = U.mT @ state["T"]
        return lam, b, a, torch.full((B,), p, dtype=torch.long)

    logger.debug("%s: %s has no Cholesky factor at damping %s; using its eigen root", fn, r_name, ar)
    state = {}

    def make_k():
        with _phase("roots", dev):
            R, new_alpha = damped_eigen_root(Cr, ar, name=r_name, **esc)
        ar[:] = new_alpha
        with _phase("products", dev):
            state["T"] = R.mT @ W
            return _gram(state["T"], Cq, aq)

    lam, U = _eigh_retry(make_k, on_fail, reason)
    T = state["T"]
    with _phase("solves", dev):
        mask = mask_of(lam)
        inv = torch.where(mask, lam, torch.ones_like(lam)).rsqrt() * mask.to(lam.dtype)
        CqT = add_damping(Cq, aq) @ T.mT if Cq is not None else T.mT  # [B, q, p]
        b = (W @ (CqT @ U)) * inv[:, None, :]
        a = (U.mT @ T) * inv[:, :, None]
    return lam, b, a, mask.sum(-1)


def _decompose(weights: Tensor, cx: Optional[Tensor], cg: Optional[Tensor], *, method: str, solver: str,
               compute_dtype: torch.dtype, damping: float, damping_max: float, damping_growth: float,
               rtol: Optional[float], device, fn: str, originals: Optional[List[Tensor]] = None,
               exact: Tuple[bool, bool] = (False, False)) -> List[Spectrum]:
    """Full decompositions of ``weights`` [B, m, n]; ``cx`` [1|B, n, n], ``cg`` [1|B, m, m] (validated).

    ``originals``: the B user tensors the spectra refer to (default ``weights.unbind(0)``);
    ``exact``: whether ``cx``/``cg`` are exactly symmetric (as :func:`_prepare` found).
    """
    B, m, n = weights.shape
    dev = _check_device(fn, device) or weights.device
    cd = compute_dtype
    rtol = _default_rtol(m, n, cd) if rtol is None else float(rtol)
    use_cx, use_cg = method in ("svd-llm", "obd"), method == "obd"
    esc = dict(damping_max=damping_max, growth=damping_growth, fn=fn)

    W = weights.to(device=dev, dtype=cd, copy=True)  # a copy of our own: scaled in place
    s_w = torch.linalg.vector_norm(W, float("inf"), dim=(-2, -1))  # max |W|, no temporary
    s_w = torch.where(s_w > 0, s_w, torch.ones_like(s_w))
    W.div_(s_w[:, None, None])
    one = torch.ones(1, dtype=cd, device=dev)
    Cx = Cg = None
    s_x = s_g = one
    ax: List[float] = [0.0]
    ag: List[float] = [0.0]
    with _phase("roots", dev):
        if use_cx:
            Cx, s_x = _prepare_cov(cx, dev, cd, exact[0])
            ax = [float(damping)] * Cx.shape[0]
        if use_cg:
            Cg, s_g = _prepare_cov(cg, dev, cd, exact[1])
            ag = [float(damping)] * Cg.shape[0]

    def mask_of(lam: Tensor) -> Tensor:
        top = lam[:, :1].clamp_min(0)
        return (lam > rtol * top) & (lam > 0)

    if solver == "eig":
        # Work in the orientation p = min(m, n) ≤ q: the p×p covariance is whitened ("rooted"),
        # the q×q one enters only through the Gram K = T C Tᵀ (never rooted, never inverted).
        flip = m > n
        Wo = W.mT if flip else W
        Cr, ar, r_name = (Cx if use_cx else None, ax, "cx") if flip else (Cg if use_cg else None, ag, "cg")
        Cq, aq = (Cg if use_cg else None, ag) if flip else (Cx if use_cx else None, ax)
        lam, fb, fa, kept = _eig_form(Wo, Cr, ar, r_name, Cq, aq, "cg" if flip else "cx", mask_of, esc, fn)
        if flip:
            fb, fa = fa.mT, fb.mT
        mask = mask_of(lam)
    else:  # cholesky
        Lg = Lx = None
        if use_cg:
            with _phase("roots", dev):
                Lg, ag = damped_cholesky(Cg, ag, name="cg", **esc)
        while True:
            if use_cx:
                with _phase("roots", dev):
                    Lx, ax = damped_cholesky(Cx, ax, name="cx", **esc)
            with _phase("products", dev):
                M = Lg.mT @ W if use_cg else W
                M = M @ Lx if use_cx else M
            try:
                with _phase("eigen", dev):
                    U, sig, Vh = torch.linalg.svd(M, full_matrices=False)
                if _finite(sig, U, Vh):
                    break
            except (torch.linalg.LinAlgError, RuntimeError):
                pass
            _Escalator(fn, ax if use_cx else None, "cx", esc, cd)("SVD of the whitened weight failed")
        with _phase("solves", dev):
            lam = sig.square()
            root = sig.sqrt()
            fb = U * root[:, None, :]
            fa = root[:, :, None] * Vh
            if use_cg:
                fb = torch.linalg.solve_triangular(Lg.mT, fb, upper=True)
            if use_cx:
                fa = torch.linalg.solve_triangular(Lx, fa, upper=False, left=False)
        mask = mask_of(lam)
        kept = torch.full((B,), lam.shape[-1], dtype=torch.long)

    # Balance each component (equal norms in b and a), undo the weight scaling, units of λ.
    # A component with a zero side contributes nothing: zero both sides.
    with _phase("solves", dev):
        nb, na = fb.norm(dim=-2), fa.norm(dim=-1)
        ok = (nb > 0) & (na > 0)
        bal = torch.where(ok, (na / torch.where(ok, nb, torch.ones_like(nb))).sqrt(), torch.zeros_like(nb))
        root_w = s_w.sqrt()
        fb = fb.mul_((bal * root_w[:, None])[:, None, :])  # fb, fa are fresh results: scale in place
        fa = fa.mul_((root_w[:, None] / torch.where(ok, bal, torch.ones_like(bal)) * ok)[:, :, None])
    lam = (lam.clamp_min(0) * (s_w.square() * s_x * s_g)[:, None]).to(torch.float64)
    if not _finite(fb, fa, lam):  # pragma: no cover - guarded by the checks above
        raise DataError(f"{fn}: weight: decomposition produced non-finite factors (compute_dtype={cd})")

    home = weights.device
    lam, fb, fa = lam.to(home), fb.to(home), fa.to(home)
    nrank, kept = mask.sum(-1).tolist(), kept.tolist()
    originals = list(weights.unbind(0)) if originals is None else originals
    out = []
    for i in range(B):
        damp = {"cx": ax[i if len(ax) > 1 else 0] if use_cx else 0.0,
                "cg": ag[i if len(ag) > 1 else 0] if use_cg else 0.0}
        out.append(Spectrum(eigenvalues=lam[i], factor_b=fb[i], factor_a=fa[i], weight=originals[i], method=method,
                            solver=solver, damping=damp, numerical_rank=int(nrank[i]), rtol=rtol, kept=int(kept[i])))
        logger.debug("%s: %s/%s [%d×%d] numerical rank %d, damping %s", fn, method, solver, m, n, nrank[i], damp)
    return out


def _prepare(fn: str, weight: Tensor, cx, cg, method: str, batched: bool):
    """Validate the tensors; returns (weights [B, m, n], cx [1|B, n, n] or None, cg [1|B, m, m] or None,
    (cx, cg) exactly symmetric)."""
    wname, xname, gname = ("weights", "cxs", "cgs") if batched else ("weight", "cx", "cg")
    _check_weight(weight, fn, wname, batched)
    w3 = weight if batched else weight.unsqueeze(0)
    B, m, n = w3.shape
    batch = B if batched else None
    cx3 = cg3 = None
    sx = sg = False
    if method in ("svd-llm", "obd"):
        if cx is None:
            raise DataError(f"{fn}: {xname} (the [{n}, {n}] input covariance C_x) is required for method={method!r}")
        cx3, sx = _check_cov(cx, n, batch, fn, xname, f"input covariance C_x, n = {wname}.shape[-1] = {n}")
    elif cx is not None:
        logger.debug("%s: %s ignored for method=%r", fn, xname, method)
    if method == "obd":
        if cg is None:
            raise DataError(f"{fn}: {gname} (the [{m}, {m}] output-gradient covariance C_g) is required "
                             "for method='obd'")
        cg3, sg = _check_cov(cg, m, batch, fn, gname, f"output-gradient covariance C_g, m = {wname}.shape[-2] = {m}")
    elif cg is not None:
        logger.debug("%s: %s ignored for method=%r", fn, gname, method)
    return w3, cx3, cg3, (sx, sg)


# --------------------------------------------------------------------------- public API


def spectrum(weight: Tensor, *, method: str = "obd", cx: Optional[Tensor] = None, cg: Optional[Tensor] = None,
             solver: str = "eig", compute_dtype: torch.dtype = torch.float64, damping: float = 0.01,
             damping_max: float = 1e3, damping_growth: float = 10.0, rtol: Optional[float] = None,
             device: Union[str, torch.device, None] = None) -> Spectrum:
    """The full decomposition of ``weight`` [m, n], computed once; cut it with :meth:`Spectrum.truncate`.

    ``cx`` [n, n] input covariance (required for ``"svd-llm"``/``"obd"``), ``cg`` [m, m]
    output-gradient covariance (required for ``"obd"``); any float dtype. Both are damped
    relatively, ``C + α·mean(diag C)·I`` with ``α = damping`` (0 allowed). Where a factorisation
    the solver needs fails, α escalates ×``damping_growth`` up to ``damping_max`` (then
    ``ValueError`` naming the covariance): for ``"cholesky"`` a Cholesky factor; for ``"eig"``
    only an eigen-decomposition with non-finite results (a covariance without a Cholesky factor
    is handled exactly by an eigen root). ``Spectrum.damping`` reports α per side. Linear algebra
    runs in ``compute_dtype`` (fp64/fp32) on ``device`` (default: the weight's); results come
    back to the weight's device. ``rtol``: eigenvalues ``λ ≤ rtol·λ_1`` are below the numerical
    rank (default ``max(m, n)·eps(compute_dtype)``).
    """
    return _spectrum("spectrum", weight, method=method, cx=cx, cg=cg, solver=solver, compute_dtype=compute_dtype,
                     damping=damping, damping_max=damping_max, damping_growth=damping_growth, rtol=rtol, device=device)


def _spectrum(fn: str, weight, *, method, cx, cg, solver, compute_dtype, damping, damping_max, damping_growth,
              rtol, device) -> Spectrum:
    _check_options(fn, method, solver, compute_dtype, damping, damping_max, damping_growth, rtol)
    w3, cx3, cg3, exact = _prepare(fn, weight, cx, cg, method, batched=False)
    return _decompose(w3, cx3, cg3, exact=exact, method=method, solver=solver, compute_dtype=compute_dtype, damping=damping,
                      damping_max=damping_max, damping_growth=damping_growth, rtol=rtol, device=device, fn=fn,
                      originals=[weight])[0]


def spectra(weights: Union[Tensor, Sequence[Tensor]], *, method: str = "obd",
            cxs: Union[Tensor, Sequence[Tensor], None] = None, cgs: Union[Tensor, Sequence[Tensor], None] = None,
            solver: str = "eig", compute_dtype: torch.dtype = torch.float64, damping: float = 0.01,
            damping_max: float = 1e3, damping_growth: float = 10.0, rtol: Optional[float] = None,
            device: Union[str, torch.device, None] = None) -> List[Spectrum]:
    """Decompose B same-shaped weights with one batched call per linear-algebra step.

    ``weights``: [B, m, n] or a sequence of B [m, n] tensors. ``cxs``: [n, n] shared by all
    (e.g. q/k/v or gate/up, which read one input: its root is then computed once), [B, n, n],
    or a sequence. ``cgs`` likewise with [m, m]. Other arguments as in :func:`spectrum`; damping
    escalates per matrix. Returns B :class:`Spectrum` objects, each equal to :func:`spectrum`
    of its weight.
    """
    fn = "spectra"
    _check_options(fn, method, solver, compute_dtype, damping, damping_max, damping_growth, rtol)

    def stack(x, name):
        if x is None or isinstance(x, Tensor):
            return x
        xs = list(x)
        if not xs or not all(isinstance(t, Tensor) for t in xs) or len({tuple(t.shape) for t in xs}) != 1:
            raise DataError(f"{fn}: {name} must be a tensor or a non-empty sequence of same-shaped tensors")
        return torch.stack(xs)

    w3, cx3, cg3, exact = _prepare(fn, stack(weights, "weights"), stack(cxs, "cxs"), stack(cgs, "cgs"), method,
                                   batched=True)
    return _decompose(w3, cx3, cg3, exact=exact, method=method, solver=solver, compute_dtype=compute_dtype, damping=damping,
                      damping_max=damping_max, damping_growth=damping_growth, rtol=rtol, device=device, fn=fn)


def factorize(weight: Tensor, rank: int, *, method: str = "obd", cx: Optional[Tensor] = None,
              cg: Optional[Tensor] = None, solver: str = "eig", compute_dtype: torch.dtype = torch.float64,
              damping: float = 0.01, damping_max: float = 1e3, damping_growth: float = 10.0,
              rank_multiple: int = 1, keep_dense_at_break_even: bool = True, rtol: Optional[float] = None,
              device: Union[str, torch.device, None] = None) -> Factorization:
    """Optimal rank-``rank`` factorisation ``b @ a ≈ weight`` under the method's loss.

    ``weight`` [m, n] (out × in, any float dtype); ``cx`` [n, n], ``cg`` [m, m] as in
    :func:`spectrum`. Returns ``b`` [m, r], ``a`` [r, n] in the weight's dtype and device, where
    ``r`` is ``rank`` rounded to the nearest multiple of ``rank_multiple`` (at least one). If
    ``r ≥ mn/(m+n)`` and ``keep_dense_at_break_even``, the weight is kept dense (``dense=True``,
    ``b = a = None``). Equal to ``spectrum(...).truncate(rank, rank_multiple, ...)``.
    """
    _check_rank(rank, rank_multiple, "factorize")
    spec = _spectrum("factorize", weight, method=method, cx=cx, cg=cg, solver=solver, compute_dtype=compute_dtype,
                    damping=damping, damping_max=damping_max, damping_growth=damping_growth, rtol=rtol, device=device)
    return spec.truncate(rank, rank_multiple, keep_dense_at_break_even=keep_dense_at_break_even)
