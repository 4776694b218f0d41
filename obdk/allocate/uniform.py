"""Uniform allocation: every matrix keeps the same fraction of its own parameters."""
from __future__ import annotations

import logging
from typing import Optional, Sequence

from ..errors import ConfigError
from .budget import Allocation, MatrixSpec, _check_specs, budget, params, round_rank, total_params, uniform_rank

log = logging.getLogger(__name__)

__all__ = ["allocate_uniform"]


def allocate_uniform(specs: Sequence[MatrixSpec], keep: float, multiple: int = 1) -> Allocation:
    """Give every ``m×n`` matrix rank ``r = keep·mn/(m+n)`` rounded to ``multiple``.

    ``r`` is rounded to the nearest multiple (at least one multiple, see
    :func:`~obdk.allocate.budget.round_rank`). When ``keep >= 1`` or the rounded
    rank reaches break-even (``r·(m+n) >= m·n``) the matrix stays dense
    (``ranks[name] = None``). Rounding may put ``params`` a little above or below
    the budget; the difference is at most half a multiple per matrix.

    ``predicted_loss`` is ``Σ costs[r:]`` when every spec carries ``costs``, else ``None``.
    """
    _check_specs(specs)
    if multiple < 1:
        raise ConfigError(f"allocate_uniform: multiple must be >= 1, got {multiple}")
    B = budget(specs, keep)
    ranks: dict[str, Optional[int]] = {}
    for s in specs:
        r: Optional[int] = None
        if keep < 1.0:
            r = round_rank(uniform_rank(s.m, s.n, keep), multiple)
            if params(s.m, s.n, r) >= s.dense_params:
                r = None
        ranks[s.name] = r
    used = sum(params(s.m, s.n, ranks[s.name]) for s in specs)
    loss = None
    if all(s.costs is not None for s in specs):
        loss = sum(s.tail_loss(ranks[s.name]) for s in specs)
    log.info("uniform allocation at keep=%.4f (multiple %d): %d params of budget %.0f, %d dense",
             keep, multiple, used, B, sum(r is None for r in ranks.values()))
    return Allocation(ranks=ranks, params=used, budget=B, total_params=total_params(specs),
                      predicted_loss=loss, strategy="uniform", meta={"multiple": multiple})


def from_config(specs: Sequence[MatrixSpec], config) -> Allocation:
    """:func:`allocate_uniform` at ``config.keep`` and ``config.rank_multiple`` (its entry in
    :data:`obdk.registry.ALLOCATORS`)."""
    return allocate_uniform(specs, config.keep, multiple=config.rank_multiple)
