"""ZS-SVD's one-step correction with a line search of its step size on held-out calibration windows.

ZS-SVD's step (:mod:`obdk.correct.steps`, ``zs``) moves every truncation ``W_r`` to ``W_r + c·G``
(``c`` the projection of what the truncation removed on the gradient) and re-truncates. On
SmolLM2-135M it helps at keep 0.8 and overshoots at keep 0.6 (README, allocation grid): the step
is a first-order extrapolation, and at high compression the loss is far from linear along it.
The guarded step (``correct="zs-guarded"``) takes the same direction at the scales ``t`` of
:data:`GRID` (``W_r + t·c·G``, each re-truncated to the same rank), measures the mean next-token
loss of the whole model at each on windows the gradient did not see, and keeps the best ``t``.
``t = 0`` (the uncorrected truncation) is on the grid and ties go to the smaller ``t``, so the
result is never worse than no correction on those windows.

Which windows: :func:`split_holdout` holds out the *last* ``guard_windows`` calibration windows
(``LowRankConfig.guard_windows``, default 8 of 32); the gradient is taken on the others. They
come from the calibration source (never an evaluation split), but the calibration statistics
(``C_x``, ``C_g``) that chose the truncation were collected on all windows, and windows drawn at
random offsets may share tokens. :func:`guarded_correct` also takes any ``holdout`` windows
(e.g. drawn with another seed) directly. Resident plans only (the line search runs the whole
model at each ``t``); a streamed plan is refused by name.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ..calibrate.head import label_positions, next_token_loss
from ..errors import ConfigError, DataError, NonFiniteLossError
from ..models import accepts_position_ids, forward_kwargs
from .steps import gradient_correct

log = logging.getLogger(__name__)

__all__ = ["GRID", "split_holdout", "heldout_loss", "guarded_correct"]

#: the step sizes the line search tries (1 = ZS-SVD's step, 0 = no correction)
GRID: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)


def split_holdout(data, windows: int):
    """``(fit, holdout)``: the calibration windows ``data`` (``input_ids`` [N, T]) without and with only their
    last ``windows`` rows (``CalibrationData``, attention masks split alike; fingerprints say which part).

    Raises :class:`~obdk.errors.DataError` naming ``guard_windows`` unless ``1 ≤ windows < N``.
    """
    from ..calibrate.data import CalibrationData
    n = int(data.input_ids.shape[0])
    if not (1 <= windows < n):
        raise DataError(f"correct='zs-guarded': guard_windows={windows} held-out windows need at least "
                        f"{windows + 1} calibration windows (the gradient needs the others), this plan has {n}; "
                        f"lower LowRankConfig.guard_windows or calibrate on more windows")
    mask = data.attention_mask
    fp = dict(getattr(data, "fingerprint", None) or {})

    def part(sl: slice, what: str) -> CalibrationData:
        return CalibrationData(input_ids=data.input_ids[sl], attention_mask=None if mask is None else mask[sl],
                               fingerprint={**fp, "guard_part": what, "guard_windows": windows, "of": n})

    return part(slice(0, n - windows), "gradient"), part(slice(n - windows, n), "holdout")


def heldout_loss(model: nn.Module, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> float:
    """Mean next-token cross entropy (nats per predicted token) of ``model`` over windows ``input_ids`` [N, T]
    (``attention_mask`` [N, T] or None: a position counts when it and its next token are real), one window at a
    time, fp32 logits. Raises :class:`~obdk.errors.NonFiniteLossError` naming the window with a NaN/inf loss."""
    dev = next(model.parameters()).device
    accepts_pos = accepts_position_ids(model)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(input_ids.shape[0]):
            ids = input_ids[i:i + 1].to(dev)
            am = None if attention_mask is None else attention_mask[i:i + 1].to(dev)
            out = model(**forward_kwargs(ids, am, accepts_pos))
            loss = float(next_token_loss(out.logits if hasattr(out, "logits") else out[0], ids, am))
            if loss != loss or loss in (float("inf"), float("-inf")):
                raise NonFiniteLossError(f"correct='zs-guarded': held-out window {i} has loss {loss}")
            lab = label_positions(am)
            total += loss
            count += int(lab.sum()) if lab is not None else ids.shape[1] - 1
    if count == 0:
        raise DataError("correct='zs-guarded': the held-out windows have no predicted token")
    return total / count


def guarded_correct(model: nn.Module, factors: Mapping[str, tuple], *, data, holdout, stats, spectra, config,
                    grid: Optional[Sequence[float]] = None, kind: str = "zs", progress: bool = False
                    ) -> tuple[dict[str, tuple], dict]:
    """ZS-SVD's step (``kind="zs"``, or ``kfac``) with its size chosen on ``holdout`` windows.

    ``model``: the dense model (targets set temporarily, restored also on error); ``factors``: ``{name: (a [r, n],
    b [m, r], predicted)}``, the truncations; ``data``: the windows of the gradient (``input_ids`` [N, T],
    ``attention_mask``); ``holdout``: the windows of the line search (``input_ids`` [K, T], disjoint from
    ``data``'s); ``stats``/``spectra``/``config``: as :func:`~obdk.correct.steps.gradient_correct` takes them
    (resident statistics only). ``grid``: the scales ``t`` tried (must contain 0; None: :data:`GRID`). One gradient pass at the
    truncation, one re-truncation per matrix and ``t > 0``, one forward over ``holdout`` per ``t``.

    Returns ``(factors at the chosen t, info)``, ``info = {"t": chosen t, "loss": {t: held-out loss}, "gradient_windows":
    N, "holdout_windows": K, "damping": the kfac step's solves at the chosen t, {} otherwise}``; at ``t = 0`` the
    factors are the input ones. The smallest ``t`` wins ties.
    """
    grid = sorted({float(t) for t in (GRID if grid is None else grid)})
    if 0.0 not in grid or any(t < 0 for t in grid):
        raise ConfigError(f"correct='zs-guarded': the step sizes {grid} must be ≥ 0 and include 0 (no correction)")
    names = list(factors)
    stepped, used = gradient_correct(model, factors, kind, data=data, stats=stats, spectra=spectra, config=config,
                                     progress=progress, scales=grid)
    originals = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    losses: dict[float, float] = {}
    from tqdm.auto import tqdm
    try:
        for j, t in enumerate(tqdm(grid, desc=f"correct [{kind}-guarded] line search", unit="step", disable=not progress,
                                   leave=False)):
            with torch.no_grad():
                for n in names:
                    a, b, _ = stepped[n][j]
                    w = model.get_submodule(n).weight
                    w.copy_((b.double() @ a.double()).to(w.dtype))
            losses[t] = heldout_loss(model, holdout.input_ids, holdout.attention_mask)
            log.info("correct [%s-guarded]: t=%g held-out loss %.6f", kind, t, losses[t])
    finally:
        with torch.no_grad():
            for n in names:
                model.get_submodule(n).weight.copy_(originals[n])
    best = min(grid, key=lambda t: (losses[t], t))
    j = grid.index(best)
    out = {n: (factors[n] if best == 0 else stepped[n][j]) for n in names}
    info = {"t": best, "loss": losses, "gradient_windows": int(data.input_ids.shape[0]),
            "holdout_windows": int(holdout.input_ids.shape[0]), "damping": used if best else {}}
    return out, info


def run(model: nn.Module, plan: Any, config, factors: dict[str, tuple], *,
        progress: bool = False) -> tuple[dict[str, tuple], dict[str, dict]]:
    """``correct='zs-guarded'`` (its entry in :data:`obdk.registry.CORRECTIONS`): :func:`guarded_correct` on the
    plan's windows less the last ``config.guard_windows``, held out; every target's report gets the step size
    chosen (``guard_t``) and the held-out loss at each size tried (``guard_loss@t``)."""
    if plan.stream is not None:
        raise ConfigError("correct='zs-guarded': its line search runs the whole model on the held-out windows "
                          "at each step size, which does not stream; prepare without stream, or use correct='zs'")
    fit, held = split_holdout(plan.data, config.guard_windows)
    factors, info = guarded_correct(model, factors, data=fit, holdout=held, stats=plan.stats,
                                    spectra=plan.spectra, config=config, progress=progress)
    log.info("correct='zs-guarded': t=%g (held-out loss %s)", info["t"],
             ", ".join(f"{t:g}: {v:.4f}" for t, v in info["loss"].items()))
    shown = {"guard_t": info["t"], **{f"guard_loss@{t:g}": v for t, v in info["loss"].items()}}
    return factors, {n: dict(shown) for n in factors}
