"""The *correct* stage: what runs after truncation and before packing.

* :mod:`obdk.correct.steps`: one-step gradient corrections, ZS-SVD's (``zs``) and the K-FAC
  natural-gradient step (``kfac``), chained as ``zs+kfac`` (obdk's default for ``obd``);
* :mod:`obdk.correct.refit`: the sequential refit (``seq``) on the compressed model's inputs.

:func:`correct` runs the one ``LowRankConfig.correct`` names. A new correction goes here: a
function ``(model, factors, ...) -> (factors, damping)`` and a name in
``obdk.config.CORRECTIONS``.
"""
from __future__ import annotations

from typing import Any

from .steps import STEPS, ZSCorrection, gradient_correct, gradient_step, zs_correct

__all__ = ["correct", "gradient_correct", "gradient_step", "zs_correct", "ZSCorrection", "STEPS"]


def correct(model, plan: Any, config, factors: dict[str, tuple], *,
            progress: bool = False) -> tuple[dict[str, tuple], dict[str, dict]]:
    """Apply ``config.resolved_correct`` to the truncated ``factors`` of ``plan``'s targets.

    ``model``: the dense model the plan was prepared on (left unchanged); ``factors``: ``{name:
    (a [r, n], b [m, r], predicted_loss)}``. Returns the corrected factors (same ranks) and, per
    target, the damping the correction's solves needed (``kfac_cx``/``kfac_cg``, ``refit_…``),
    to be reported next to the decomposition's. No correction (or no factors): unchanged.
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
    if stream and stream.get("owners") is not None:
        # an owner-reduced streamed plan under torch.distributed: rank 0 alone holds the truncated factors; every
        # rank needs them (W_r = b a for the gradient passes), r columns each (obdk.calibrate.distributed)
        from ..calibrate import distributed as dist
        from .steps import check_world
        check_world(stream)
        rank = dist.world()[0]
        factors = dist.broadcast_factors(factors if rank == 0 else {}, {n: 0 for n in factors},
                                         {n: model.get_submodule(n).weight for n in factors})
    for step in kind.split("+"):  # e.g. zs+kfac: one gradient pass per step, each at the previous result
        factors, used = gradient_correct(model, factors, step, data=plan.data, stats=plan.stats,
                                         spectra=plan.spectra, config=config, progress=progress,
                                         stream=stream)
        for n, d in used.items():
            extra.setdefault(n, {}).update({f"kfac_{k}": v for k, v in d.items()})
    return factors, extra
