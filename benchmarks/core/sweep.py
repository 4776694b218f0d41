"""The keep sweep: one prepared plan, many compressed copies, each handed back to be evaluated.

A *point* is what one row compresses with: a keep (``0.8``) or a dict of :meth:`obdk.Plan.apply`
overrides with its keep (``{"keep": 0.8, "alloc": "global", "correct": "none"}``), as
:func:`obdk.compress_many` takes them. For each point :func:`keep_sweep` makes a fresh copy of
the dense model, applies the point to it (timed, device synchronised), and yields an
:class:`Applied`; the caller evaluates the copy and writes its row. When the caller asks for
the next point the copy is dropped and memory freed, so at most one compressed copy is alive.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import torch.nn as nn

from .timing import free, sync

Point = Union[float, dict]


@dataclass
class Applied:
    """One point of a sweep: the compressed copy, what ``apply`` returned, the point, and its wall time."""
    model: Optional[nn.Module]
    report: Any
    point: dict
    seconds: float


def as_point(p: Point) -> dict:
    """``0.8`` → ``{"keep": 0.8}``; a dict is copied (it must name its ``keep``)."""
    if isinstance(p, dict):
        if "keep" not in p:
            raise ValueError(f"a sweep point needs a 'keep': {p!r}")
        return dict(p)
    return {"keep": float(p)}


def keep_sweep(model: nn.Module, points: Iterable[Point], apply: Callable[..., Any], *,
               clone: Callable[[nn.Module], nn.Module] = copy.deepcopy,
               skip: Optional[Callable[[dict], bool]] = None, device=None) -> Iterator[Applied]:
    """For each point not ``skip``-ped: ``apply(clone(model), **point)``, timed, then yield it.

    ``apply`` is usually ``plan.apply`` (a report comes back); a baseline passes its own
    function of ``(model_copy, keep=..., ...)``. ``clone`` makes the copy (default
    ``copy.deepcopy``; e.g. a copy moved to the GPU), outside the timed region. ``device``: sync
    it before the clock stops. ``model`` itself is never modified.
    """
    for p in points:
        point = as_point(p)
        if skip is not None and skip(point):
            continue
        m = clone(model)
        free()
        t0 = time.perf_counter()
        report = apply(m, **point)
        if device is not None:
            sync(device)
        res = Applied(m, report, point, time.perf_counter() - t0)
        del m
        try:
            yield res
        finally:
            res.model = None  # the caller's handle no longer keeps the copy alive
            free()


def plan_seconds(plan, *stages: str) -> float:
    """Seconds ``plan`` spent in ``stages`` (obdk's stage names: ``calibration``, ``factorisation``, ...); 0 if absent."""
    return sum(float(plan.timer.stages[s].seconds) for s in stages if s in plan.timer.stages)
