"""The *correct* stage: what runs after truncation and before packing.

* :mod:`obdk.correct.steps`: one-step gradient corrections, ZS-SVD's (``zs``) and the K-FAC
  natural-gradient step (``kfac``), chained as ``zs+kfac`` (obdk's default for ``obd``);
* :mod:`obdk.correct.guarded`: ZS-SVD's step with its size chosen by a line search on held-out
  calibration windows (``zs-guarded``; never worse than no correction on them);
* :mod:`obdk.correct.refit`: the sequential refit (``seq``) on the compressed model's inputs.

:func:`correct` runs the one ``LowRankConfig.correct`` names. A new correction goes here: a
file with a ``run(model, plan, config, factors, *, progress) -> (factors, damping)`` (copy
``obdk/correct/refit.py::run``) and an entry in :data:`obdk.registry.CORRECTIONS`.
"""
from __future__ import annotations

import logging
from typing import Any

from ..registry import CORRECTIONS, load
from .factor_store import FactorStore, Truncations
from .guarded import guarded_correct
from .steps import STEPS, ZSCorrection, gradient_correct, gradient_step, zs_correct

log = logging.getLogger(__name__)

__all__ = ["correct", "gradient_correct", "gradient_step", "guarded_correct", "zs_correct", "ZSCorrection", "STEPS", "FactorStore", "Truncations"]


def correct(model, plan: Any, config, factors: dict[str, tuple], *,
            progress: bool = False) -> tuple[dict[str, tuple], dict[str, dict]]:
    """Apply ``config.resolved_correct`` to the truncated ``factors`` of ``plan``'s targets.

    ``model``: the dense model the plan was prepared on (left unchanged); ``factors``: ``{name:
    (a [r, n], b [m, r], predicted_loss)}``. Runs the correction's :data:`obdk.registry.CORRECTIONS` entry and
    returns the corrected factors (same ranks) and, per target, the damping the correction's solves needed
    (``kfac_cx``/``kfac_cg``, ``refit_…``), to be reported next to the decomposition's; ``zs-guarded`` adds the
    step size it chose (``guard_t``) and the held-out loss at each size tried (``guard_loss@t``) to every
    target's. No correction (or no factors): unchanged.
    """
    kind = config.resolved_correct
    if not kind or not factors:
        return factors, {}
    return load(CORRECTIONS[kind].run)(model, plan, config, factors, progress=progress)
