"""The *heal* stage: after truncation and the corrections, before packing, the factors are trained to match the
dense model, at the same ranks (the checkpoint format is unchanged).

* ``layer`` (:mod:`obdk.heal.layerwise`): each decoder layer, fed the compressed model's input to it, trained to
  reproduce the dense layer's output on the dense input (MSE); one decoder layer on the compute device at a time,
  so it runs in the streamed pipeline (``--stream``, ``--weights-on-disk``, each rank its windows under
  ``torchrun``);
* ``e2e`` (:mod:`obdk.heal.e2e`): all factors together on the KL divergence of the next-token distribution from the
  dense model's (the teacher run alongside), for models that fit.

Both train the factors ``a``, ``b`` directly (fp32 masters for 16-bit models) with Adam from the schedule of
:mod:`obdk.heal.train`, stop early on a held-out slice of the healing windows, and keep the best held-out point,
the truncated factors included (healing is never worse than none on the held-out windows).
:func:`heal` runs the one ``LowRankConfig.heal`` names, by its :data:`obdk.registry.HEALINGS` entry.
"""
from __future__ import annotations

import time
from typing import Any, Mapping

import torch.nn as nn

from ..errors import ConfigError
from ..registry import HEALINGS, load
from .train import Schedule, heldout_split

__all__ = ["heal", "schedule_of", "run_layerwise", "run_e2e"]


def schedule_of(config) -> Schedule:
    """The :class:`~obdk.heal.train.Schedule` of ``config``'s ``heal_*`` fields (the mode's defaults for None)."""
    entry = HEALINGS[config.resolved_heal]
    steps = entry.steps if config.heal_steps is None else int(config.heal_steps)
    lr = entry.lr if config.heal_lr is None else float(config.heal_lr)
    return Schedule(steps=steps, batch=int(config.heal_batch), lr=lr, eval_every=entry.eval_every,
                    patience=entry.patience, seed=int(config.heal_seed))


def heal(model: nn.Module, plan: Any, config, factors: Mapping[str, tuple], *, data: Any,
         progress: bool = False) -> tuple[Mapping[str, tuple], dict]:
    """Heal the truncated (and corrected) ``factors`` ``{name: (a [r, n], b [m, r], predicted_loss)}`` of ``plan``'s
    ``model`` (dense, left unchanged) on ``data`` (windows: ``input_ids`` [N, T], ``attention_mask``).

    Returns the healed factors (same ranks; a dict, or for a streamed plan in one process a
    :class:`~obdk.correct.factor_store.FactorStore`) and a record for the report: ``mode``, ``windows``, ``tokens``,
    ``held_out`` windows, ``steps`` and the held-out loss before and after (per layer for ``layer``), ``seconds``.
    """
    from ..calibrate.stats import _windows
    from ..stream import distributed as dist
    mode = config.resolved_heal
    entry = HEALINGS[mode]
    if not factors:
        raise ConfigError(f"heal={mode!r} at keep {config.keep:g}: no target is factorised (every one is kept dense), "
                          f"so there are no factors to train; lower keep or heal='none'")
    if plan.stream is not None and entry.stream_refusal is not None:
        raise ConfigError(f"heal={mode!r} on a streamed plan: {entry.stream_refusal}")
    ids, mask, _ = _windows(data)
    n = int(ids.shape[0])
    train_w, held = heldout_split(n, float(config.heal_holdout))
    schedule = schedule_of(config)
    rank, world = dist.world()
    mine = dist.shard(n, rank, world)
    t0 = time.perf_counter()
    healed, rec, per_layer = load(entry.run)(model, plan, config, factors, ids, mask, windows=mine,
                                             train_windows=train_w, held_out=held, schedule=schedule,
                                             progress=progress)
    tokens = int(mask.bool().sum()) if mask is not None else int(ids.numel())
    info = {"mode": mode, "windows": n, "tokens": tokens, "held_out_windows": len(held), "steps_max": schedule.steps,
            "batch": schedule.batch, "lr": schedule.lr, "seed": schedule.seed,
            **({"ce": float(config.heal_ce)} if mode == "e2e" else {}), **rec,
            "seconds": time.perf_counter() - t0}
    if per_layer is not None:
        info["layers"] = {str(i): r for i, r in sorted(per_layer.items())}
    return healed, info


def run_layerwise(model, plan, config, factors, ids, mask, *, windows, train_windows, held_out, schedule, progress):
    """``HEALINGS["layer"].run``: :func:`~obdk.heal.layerwise.heal_layerwise` where the plan's passes run (a streamed
    plan's device, shards, scratch and host budget); ``(healed, summary, {layer: record})``."""
    from ..correct.factor_store import FactorStore
    from ..models import trunk
    from .layerwise import heal_layerwise
    runner = trunk(model, {n: model.get_submodule(n) for n in factors})
    stream = plan.stream
    if stream is None:
        dev = next(iter(model.get_submodule(n) for n in factors)).weight.device
        out: Any = {}
        opts = {"device": dev}
    else:
        out = FactorStore(scratch_dir=stream.scratch_dir, budget=stream.budget) if not stream.owner_reduced else {}
        opts = {"device": stream.device, "source": stream.source, "scratch_dir": stream.scratch_dir,
                "budget": stream.budget}
    try:
        per_layer = heal_layerwise(model, factors, ids, mask, out, windows=windows, train_windows=train_windows,
                                   held_out=held_out, schedule=schedule, runner=runner, progress=progress, **opts)
    except BaseException:
        if isinstance(out, FactorStore):
            out.free()
        raise
    return out, _summary(per_layer), per_layer


def run_e2e(model, plan, config, factors, ids, mask, *, windows, train_windows, held_out, schedule, progress):
    """``HEALINGS["e2e"].run``: :func:`~obdk.heal.e2e.heal_e2e` with ``config.heal_ce``; ``(healed, record, None)``."""
    from .e2e import heal_e2e
    healed, rec = heal_e2e(model, factors, ids, mask, windows=windows, train_windows=train_windows,
                           held_out=held_out, schedule=schedule, ce=float(config.heal_ce), progress=progress)
    return healed, rec, None


def _summary(per_layer: dict[int, dict]) -> dict:
    """Totals of the layers' records: steps summed, held-out MSE summed before and after (None without a held-out
    slice), and how many layers stopped early."""
    recs = list(per_layer.values())
    have = [r for r in recs if r["heldout_before"] is not None]
    return {"steps": sum(r["steps"] for r in recs),
            "heldout_before": sum(r["heldout_before"] for r in have) if have else None,
            "heldout_after": sum(r["heldout_after"] for r in have) if have else None,
            "stopped_early": sum(r["stopped"] == "early" for r in recs)}
