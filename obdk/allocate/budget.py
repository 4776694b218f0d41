"""The parameter budget, defined once, and the types every allocator shares.

``keep`` is the fraction of the *targeted* Linear parameters that is kept. A
matrix ``m×n`` kept dense costs ``m·n`` parameters; factorised at rank ``r`` it
costs ``r·(m+n)``. The break-even rank is ``r* = mn/(m+n)``: a factorisation
saves parameters only if ``r < r*``; at or above it the matrix is kept dense.
The budget is ``keep · Σ m·n`` over the targeted matrices (biases, embeddings
and a tied ``lm_head`` are not part of it).

Ranks in an :class:`Allocation` are ``int`` (factorised, ``0 < r < r*``) or
``None`` (dense); :func:`params` prices either.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import Tensor

from ..errors import ConfigError

log = logging.getLogger(__name__)

__all__ = [
    "params", "break_even", "max_factored_rank", "round_rank", "uniform_rank",
    "total_params", "budget", "MatrixSpec", "Allocation",
]


def params(m: int, n: int, rank: Optional[int]) -> int:
    """Parameters of an ``m×n`` matrix: ``m·n`` dense (``rank=None``), else ``rank·(m+n)``.

    A rank at or above break-even is priced as factorised (``rank·(m+n)``), which is
    more than dense; allocators never choose it.
    """
    if m <= 0 or n <= 0:
        raise ConfigError(f"params: matrix dims must be positive, got {m}×{n}")
    if rank is None:
        return m * n
    if rank < 0:
        raise ConfigError(f"params: rank must be >= 0 or None (dense), got {rank}")
    return int(rank) * (m + n)


def break_even(m: int, n: int) -> float:
    """The break-even rank ``r* = mn/(m+n)`` of an ``m×n`` matrix (a float, ``< min(m, n)``): factors ``[m, r] +
    [r, n]`` hold as many parameters as ``[m, n]``. The one copy (:func:`obdk.decompose.break_even_rank` is it)."""
    if m <= 0 or n <= 0:
        raise ConfigError(f"break_even: m and n must be positive, got m={m}, n={n}")
    return m * n / (m + n)


def max_factored_rank(m: int, n: int, multiple: int = 1) -> int:
    """Largest rank that is a multiple of ``multiple`` and saves parameters: ``r·(m+n) < m·n``.

    Returns 0 when no positive multiple is below break-even (the matrix can only stay dense).
    """
    if multiple < 1:
        raise ConfigError(f"max_factored_rank: multiple must be >= 1, got {multiple}")
    r = (m * n - 1) // (m + n)  # largest integer with r(m+n) < mn
    return (r // multiple) * multiple


def round_rank(r: float, multiple: int = 1) -> int:
    """Round a rank to the nearest multiple of ``multiple`` (halves round up), at least ``multiple``.

    ``r <= 0`` still gives ``multiple``: a factorised matrix keeps at least one block.
    """
    if multiple < 1:
        raise ConfigError(f"round_rank: multiple must be >= 1, got {multiple}")
    if not math.isfinite(r):
        raise ConfigError(f"round_rank: rank must be finite, got {r}")
    k = math.floor(r / multiple + 0.5)
    return max(1, k) * multiple


def uniform_rank(m: int, n: int, keep: float) -> float:
    """The unrounded uniform rank ``keep·mn/(m+n)``: the rank whose factors cost ``keep·m·n``."""
    return keep * break_even(m, n)


def total_params(specs: Iterable["MatrixSpec"]) -> int:
    """Dense parameter count ``Σ m·n`` of the targeted matrices."""
    return sum(s.m * s.n for s in specs)


def budget(specs: Iterable["MatrixSpec"], keep: float) -> float:
    """The parameter budget ``keep · Σ m·n``. ``keep`` must lie in ``(0, 1]``."""
    if not (0.0 < keep <= 1.0):
        raise ConfigError(f"budget: keep is the fraction of targeted parameters kept and must lie in (0, 1], got {keep}")
    return keep * total_params(specs)


def _as_vector(x: Optional[Tensor], name: str, what: str, limit: int) -> Optional[Tensor]:
    if x is None:
        return None
    t = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if t.dim() != 1:
        raise ConfigError(f"MatrixSpec {name!r}: {what} must be 1-D, got shape {tuple(t.shape)}")
    if t.numel() > limit:
        raise ConfigError(f"MatrixSpec {name!r}: {what} has {t.numel()} entries, more than min(m, n) = {limit}")
    if not torch.isfinite(t).all():
        raise ConfigError(f"MatrixSpec {name!r}: {what} contains non-finite values")
    return t


@dataclass
class MatrixSpec:
    """One targeted ``m×n`` matrix (out × in) and its per-component scores.

    Every score vector is 1-D with at most ``min(m, n)`` entries, indexed by
    component in *spectral* order (index 0 = largest singular value / eigenvalue);
    components past the end of a vector score 0. All are stored as CPU fp64.

    * ``costs[i]``: predicted loss increase of dropping component ``i``
      (``λ_i/2`` in OBD units), non-increasing in ``i``. Used by
      :func:`~obdk.allocate.allocate_global` and for ``predicted_loss`` of uniform.
    * ``deltas[i]``: ZS-SVD's first-order loss change of removing component ``i``
      (any sign). Used by :func:`~obdk.allocate.allocate_zero_sum`.
    * ``importance[i]``: BSI importance (predicted loss increase of removing
      component ``i``, any sign, any order). Used by :func:`~obdk.allocate.allocate_bsi`.
    """
    name: str
    m: int
    n: int
    costs: Optional[Tensor] = None
    deltas: Optional[Tensor] = None
    importance: Optional[Tensor] = None

    def __post_init__(self) -> None:
        if self.m <= 0 or self.n <= 0:
            raise ConfigError(f"MatrixSpec {self.name!r}: dims must be positive, got {self.m}×{self.n}")
        self.m, self.n = int(self.m), int(self.n)
        k = min(self.m, self.n)
        self.costs = _as_vector(self.costs, self.name, "costs", k)
        self.deltas = _as_vector(self.deltas, self.name, "deltas", k)
        self.importance = _as_vector(self.importance, self.name, "importance", k)
        if self.costs is not None and self.costs.numel() > 1:
            d = self.costs[1:] - self.costs[:-1]
            tol = 1e-12 * float(self.costs.abs().max())
            if (d > tol).any():
                raise ConfigError(f"MatrixSpec {self.name!r}: costs must be non-increasing (spectral order); "
                                 f"first increase at index {int(torch.nonzero(d > tol)[0]) + 1}")

    @property
    def dense_params(self) -> int:
        """``m·n``."""
        return self.m * self.n

    @property
    def full_rank(self) -> int:
        """``min(m, n)``."""
        return min(self.m, self.n)

    def tail_loss(self, rank: Optional[int]) -> float:
        """Predicted loss of keeping the top ``rank`` components: ``Σ_{i >= rank} costs[i]`` (0 if dense).

        Raises ``ValueError`` when the spec carries no ``costs``.
        """
        if self.costs is None:
            raise ConfigError(f"MatrixSpec {self.name!r}: no costs given")
        if rank is None:
            return 0.0
        return float(self.costs[rank:].sum())


@dataclass
class Allocation:
    """The result of a rank allocation.

    ``ranks[name]`` is an ``int`` (factorised at that rank) or ``None`` (kept dense).
    ``params`` = Σ priced parameters of the choice; ``budget`` = ``keep·total_params``;
    ``total_params`` = dense ``Σ m·n``; ``predicted_loss`` in the units of the scores
    used (``None`` when no scores were given); ``strategy`` names the allocator;
    ``meta`` holds allocator-specific details (bounds, traces, kept index sets).
    """
    ranks: dict[str, Optional[int]]
    params: int
    budget: float
    total_params: int
    predicted_loss: Optional[float]
    strategy: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def keep(self) -> float:
        """Achieved kept fraction ``params / total_params``."""
        return self.params / self.total_params if self.total_params else 1.0

    @property
    def dense(self) -> list[str]:
        """Names of the matrices kept dense."""
        return [k for k, r in self.ranks.items() if r is None]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable summary (``meta`` entries that are tensors become lists)."""
        def _plain(v: Any) -> Any:
            if isinstance(v, Tensor):
                return v.tolist()
            if isinstance(v, dict):
                return {str(k): _plain(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [_plain(x) for x in v]
            return v
        return {"ranks": dict(self.ranks), "params": self.params, "budget": self.budget,
                "total_params": self.total_params, "keep": self.keep,
                "predicted_loss": self.predicted_loss, "strategy": self.strategy, "meta": _plain(self.meta)}


def _check_specs(specs: Sequence[MatrixSpec]) -> None:
    names = [s.name for s in specs]
    if not names:
        raise ConfigError("allocation needs at least one MatrixSpec")
    if len(set(names)) != len(names):
        dup = sorted({x for x in names if names.count(x) > 1})
        raise ConfigError(f"duplicate MatrixSpec names: {dup}")
