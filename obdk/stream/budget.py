"""The one byte budget of host memory a streamed plan's stores and every streamed pass's buffers share."""
from __future__ import annotations

import math
import numbers
from typing import Optional

from ..errors import ConfigError

__all__ = ["HostBudget", "budget_of"]


class HostBudget:
    """Bytes of host memory that several kept stores draw on together.

    ``limit``: bytes allowed (None: no limit; an int ≥ 0, else :class:`ConfigError` naming ``option``
    and ``owner``). A store calls :meth:`take` before keeping ``nbytes`` on host memory: True (counted)
    if the sum of everything taken stays within ``limit``, else False and the store writes those bytes
    to its scratch files instead; :meth:`give` returns bytes a store frees. ``used``: bytes held now by
    every store on this budget; ``peak``: the most held at once, so ``peak <= limit`` always.
    """

    def __init__(self, limit: Optional[int] = None, *, option: str = "max_host_memory",
                 owner: str = "HostBudget") -> None:
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, numbers.Real)
                                  or not math.isfinite(limit) or limit < 0):
            raise ConfigError(f"{owner}: {option} must be >= 0 bytes, got {limit!r}")
        self.limit = None if limit is None else int(limit)
        self.used = self.peak = 0

    def take(self, nbytes: int) -> bool:
        """Count ``nbytes`` against the budget if they fit (True), else change nothing (False)."""
        nbytes = int(nbytes)
        if self.limit is not None and self.used + nbytes > self.limit:
            return False
        self.used += nbytes
        self.peak = max(self.peak, self.used)
        return True

    def give(self, nbytes: int) -> None:
        """Return ``nbytes`` a store no longer holds."""
        self.used = max(0, self.used - int(nbytes))

    def __repr__(self) -> str:
        return f"HostBudget(limit={self.limit}, used={self.used}, peak={self.peak})"


def budget_of(owner: str, max_host_memory: Optional[int], budget: Optional[HostBudget]) -> HostBudget:
    """The budget a store of ``owner`` draws on: the shared ``budget``, else a new one of ``max_host_memory`` bytes
    (giving both is a :class:`ConfigError` naming ``owner``)."""
    if budget is None:
        return HostBudget(max_host_memory, owner=owner)
    if max_host_memory is not None:
        raise ConfigError(f"{owner}: give max_host_memory or budget (a shared HostBudget), not both")
    if not isinstance(budget, HostBudget):
        raise ConfigError(f"{owner}: budget must be a HostBudget, got {type(budget).__name__}")
    return budget
