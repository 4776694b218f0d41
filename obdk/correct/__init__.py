"""The *correct* stage: what runs after truncation and before packing.

* :mod:`obdk.correct.steps`: one-step gradient corrections, ZS-SVD's (``zs``) and the K-FAC
  natural-gradient step (``kfac``), chained as ``zs+kfac`` (obdk's default for ``obd``);
* :mod:`obdk.correct.guarded`: ZS-SVD's step with its size chosen by a line search on held-out
  calibration windows (``zs-guarded``; never worse than no correction on them);
* :mod:`obdk.correct.refit`: the sequential refit (``seq``) on the compressed model's inputs.

:func:`correct` runs the one ``LowRankConfig.correct`` names. A new correction goes here: a
function ``(model, factors, ...) -> (factors, damping)`` and a name in
``obdk.config.CORRECTIONS``.
"""
from __future__ import annotations

import logging
from typing import Any

from ..errors import ConfigError
from .guarded import guarded_correct, split_holdout
from .steps import STEPS, ZSCorrection, gradient_correct, gradient_step, zs_correct
from .factor_store import FactorStore, Truncations

log = logging.getLogger(__name__)

__all__ = ["correct", "gradient_correct", "gradient_step", "guarded_correct", "zs_correct", "ZSCorrection", "STEPS", "FactorStore", "Truncations"]


def correct(model, plan: Any, config, factors: dict[str, tuple], *,
            progress: bool = False) -> tuple[dict[str, tuple], dict[str, dict]]:
    """Apply ``config.resolved_correct`` to the truncated ``factors`` of ``plan``'s targets.

    ``model``: the dense model the plan was prepared on (left unchanged); ``factors``: ``{name:
    (a [r, n], b [m, r], predicted_loss)}``. Returns the corrected factors (same ranks) and, per
    target, the damping the correction's solves needed (``kfac_cx``/``kfac_cg``, ``refit_…``),
    to be reported next to the decomposition's; ``zs-guarded`` adds the step size it chose
    (``guard_t``) and the held-out loss at each size tried (``guard_loss@t``) to every target's.
    No correction (or no factors): unchanged.
    """
    kind = config.resolved_correct
    if not kind or not factors:
        return factors, {}
    extra: dict[str, dict] = {}
    if kind == "seq":
        from .refit import sequential_refit
        factors, used = sequential_refit(model, plan, {n: f[0].shape[0] for n, f in factors.items()}, plan.data,
                                         progress=progress)
        return factors, {n: {f"refit_{k}": v for k, v in d.items()} for n, d in used.items()}
    stream = getattr(plan, "stream", None)
    if kind == "zs-guarded":
        if stream:
            raise ConfigError("correct='zs-guarded': its line search runs the whole model on the held-out windows "
                              "at each step size, which does not stream; prepare without stream, or use correct='zs'")
        fit, held = split_holdout(plan.data, config.guard_windows)
        factors, info = guarded_correct(model, factors, data=fit, holdout=held, stats=plan.stats,
                                        spectra=plan.spectra, config=config, progress=progress)
        log.info("correct='zs-guarded': t=%g (held-out loss %s)", info["t"],
                 ", ".join(f"{t:g}: {v:.4f}" for t, v in info["loss"].items()))
        shown = {"guard_t": info["t"], **{f"guard_loss@{t:g}": v for t, v in info["loss"].items()}}
        return factors, {n: dict(shown) for n in factors}
    if stream and stream.get("owners") is not None:
        # an owner-reduced streamed plan under torch.distributed: rank 0 alone holds the truncated factors; every
        # rank needs them (W_r = b a for the gradient passes), r columns each (obdk.stream.distributed)
        from ..stream import distributed as dist
        from .steps import check_world
        check_world(stream)
        rank = dist.world()[0]
        factors = dist.broadcast_factors(factors if rank == 0 else {}, {n: 0 for n in factors},
                                         {n: model.get_submodule(n).weight for n in factors})
    for step in kind.split("+"):  # e.g. zs+kfac: one gradient pass per step, each at the previous result
        prev = factors
        factors, used = gradient_correct(model, factors, step, data=plan.data, stats=plan.stats,
                                         spectra=plan.spectra, config=config, progress=progress,
                                         stream=stream)
        if isinstance(prev, FactorStore):  # a streamed step's results, read by this step: done with
            prev.free()
        for n, d in used.items():
            extra.setdefault(n, {}).update({f"kfac_{k}": v for k, v in d.items()})
    return factors, extra
