"""Layer-streamed exact calibration: the statistics of :func:`~obdk.calibrate.stats.calibrate` with one
decoder layer's statistics (and one layer's autograd graph) alive at a time.

:func:`calibrate_streamed` is a consumer of a :class:`~obdk.stream.sweep.LayerSweep` (capture, forward sweep,
head, backward sweep; see there): with ``stats=("cx",)`` alone ``C_x`` is collected in the forward sweep (the
layer's Linears run through the fused :class:`~obdk.calibrate.function.CalibrationLinear`) and layer ``i``'s
statistics are final after its forward; with ``cg``/``grad`` the head is the final norm and the windowed LM-head
loss gradient (:func:`~obdk.calibrate.head.head_backward`, the same code and the same true-Fisher generators
``window_generator(seed, window)`` as the resident pass) and everything is collected in the backward sweep, where
layer ``i`` is recomputed from its stored input under the calibration Function (``C_x`` is collected *there*,
never also in the forward sweep). The accumulators are the resident pass's
(:func:`~obdk.calibrate.stats.accumulators`, armed one layer at a time) and so is the normaliser
(:func:`~obdk.calibrate.stats.move_normalised`): a finished layer's sums are reduced (to every rank, or to each
group's owner), normalised, handed to ``on_layer(i, stats_i)`` and, unless dropped, kept.

Padding rows are excluded exactly as in :func:`~obdk.calibrate.stats.calibrate` (the same
:class:`~obdk.calibrate.function.CalibrationContext` row selection; padded windows get the same
``attention_mask``/``position_ids`` the resident pass feeds the trunk). The normalisers ``tokens`` and
``loss_tokens``, the keys, their forward order and the fingerprint are the resident pass's, so a
streamed :class:`Statistics` can stand in for a resident one (same cache key).

Memory: the statistics of one decoder layer (Llama-7B: 1.9 GiB in fp32) when ``on_layer`` takes them
and ``keep=False``; the sweep's boundary activations (see :mod:`obdk.stream.sweep`).

Placement (``device``, ``source``): when the model lives elsewhere than ``device`` (host memory,
``device="cuda"``), each decoder layer is copied onto ``device`` for its work in the forward sweep and again in
the backward sweep and its host tensors put back afterwards (at most one decoder layer on ``device``);
embeddings, rotary embedding, final norm and head are there only while used; accumulators are allocated on
``device``; boundary buffers stay in host memory. A ``source`` (:class:`~obdk.stream.shards.ShardedWeights` over
the checkpoint of a skeleton from :func:`~obdk.stream.shards.load_skeleton`, decoder-layer parameters on the meta
device) is read layer by layer onto the compute device in each parameter's dtype and replaced by the meta
parameters after. With ``on_fetch`` every fetched layer is a private copy (one layer's extra memory), so an
overwrite (e.g. a correction installing ``b @ a``) is gone at its release and the model never sees it. With
``keep``, each part is moved to host memory after ``on_layer`` when ``device`` is not the model's.

``info`` keys: ``peak_stats_bytes`` (the most accumulator bytes held at once), ``peak_host_bytes``,
``spilled_bytes``, ``scratch_files``, ``seconds`` per phase, ``peak_layers_materialized`` (1),
``weights_read_bytes`` (stored bytes the sweeps read from ``source``), ``fingerprint_read_bytes`` (the
fingerprint's read of every meta parameter), ``weights_moved_bytes`` (bytes copied to ``device``), ``device``;
under a process group ``distributed``: this rank's ``rank``, ``world``, ``windows``, ``reduce``, ``owners``
(group key → rank) and the :func:`~obdk.stream.distributed.traffic` counters of this call (``reduce_bytes``,
``all_reduce_bytes``, ``share_bytes``, ``object_bytes``, ``collective_seconds``, ``collectives``).

``reduce="owner"``: each shared-input group has an owner rank (:func:`~obdk.stream.distributed.assign_owners`,
balanced by :func:`~obdk.stream.distributed.decomposition_cost` over the whole model, the same on every rank, or
the given ``owners``, e.g. a previous pass's ``info["distributed"]["owners"]``, which must name every group); its
``C_x`` and its Linears' ``C_g``/``∂L/∂W`` are SUM-reduced to the owner only, and every other rank frees them at
once. ``on_layer`` then receives, on each rank, a part holding only the groups that rank owns (possibly none; it
is still called, so that a collective inside it runs on every rank), and the result holds only the owned
statistics. Without a group (or with one rank) ``"all"`` and ``"owner"`` are the same.

Supported: the model types whose :class:`~obdk.models.Architecture` ``streams`` (:data:`STREAM_TYPES`), whose
decoder layers hold every targeted Linear (and, with gradients, whose head is plain,
:func:`~obdk.calibrate.head.plain_head`).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ..errors import ConfigError, DataError, StreamingUnsupportedError
from ..models import ARCHITECTURES, decoder_layers, trunk
from ..stream import distributed as dist
from ..stream.boundary import BoundaryStore  # noqa: F401  (importable here, as before)
from ..stream.shards import ShardedWeights
from ..stream.sweep import Batch, LayerSweep, SweepHooks
from .function import CalibrationContext
from .head import head_backward, label_positions, plain_head
from .memory import _resolve_groups
from .statistics import STATS, Statistics
from .stats import (
    _check_finite_weights,
    _check_options,
    _Patch,
    _windows,
    accumulators,
    calibration_fingerprint,
    move_normalised,
)

log = logging.getLogger(__name__)

__all__ = ["calibrate_streamed", "StreamingUnsupportedError", "STREAM_TYPES", "BoundaryStore"]

#: model types the streamed schedule runs (:attr:`obdk.models.Architecture.streams`)
STREAM_TYPES = frozenset(k for k, a in ARCHITECTURES.items() if a.streams)


def calibrate_streamed(model: nn.Module, data: Any, *, stats: Sequence[str] = ("cx", "cg"), fisher: str = "empirical",
                       seed: int = 0, batch_size: int = 1, dtype: torch.dtype = torch.float32, progress: bool = True,
                       scratch_dir: Optional[str | os.PathLike] = None, max_host_memory: Optional[int] = None,
                       on_layer: Optional[Callable[[int, Statistics], Any]] = None, keep: Optional[bool] = None,
                       groups=None, info: Optional[dict] = None, reduce: str = "all",
                       owners: Optional[dict] = None, device: Optional[str | torch.device] = None,
                       source: Optional[ShardedWeights] = None,
                       on_fetch: Optional[Callable[[int, nn.Module], Any]] = None,
                       fingerprint: bool = True, budget=None) -> Statistics:
    """The statistics of :func:`~obdk.calibrate.stats.calibrate`, computed one decoder layer at a time.

    ``data``, ``stats``, ``fisher``, ``seed``, ``batch_size`` (windows per layer call), ``dtype`` (float32 or
    float64 accumulators): as for ``calibrate``. Returns :class:`Statistics` with ``cx[key]`` [n, n] (``/tokens``),
    ``cg[name]`` [m, m] (``/loss_tokens``), ``grad[name]`` [m, n] (summed), equal to ``calibrate``'s up to rounding
    (same keys in the same order, same normalisers and fingerprint).

    * ``scratch_dir``/``max_host_memory`` or ``budget`` (a :class:`~obdk.stream.budget.HostBudget` shared with the
      stores of a streamed plan): where the boundary activations ([N, T, d] per layer boundary, model dtype) live,
      host memory first (:class:`~obdk.stream.boundary.BoundaryStore`).
    * ``on_layer(i, stats_i)``: called when decoder layer ``i``'s statistics are final (top layer first with
      gradients, bottom first for ``cx`` alone) with that layer's normalised part (``Statistics.merge`` of all parts
      is the full result), while layer ``i`` is still on the compute device. ``keep``: keep each part in the result
      (default: True without ``on_layer``, False with one: one layer's statistics held at a time).
    * ``groups``: the ``LinearGroup`` list (default :func:`obdk.models.linear_groups`; each inside a decoder layer).
    * ``reduce``: under a process group, ``"all"`` (every rank holds every statistic) or ``"owner"`` (each group's
      sums go to its owner rank alone, balanced over the model or ``owners={group key: rank}``; ``on_layer`` still
      runs on every rank, with the groups that rank owns).
    * ``device``, ``source``, ``on_fetch(i, layer)``: where the sweeps compute and where the layers come from (a
      :class:`~obdk.stream.shards.ShardedWeights` for a skeleton); ``on_fetch`` may overwrite the fetched layer (a
      private copy). Every parameter is back where it was when the call returns or raises.
    * ``info``: filled with what the run measured (see the module docstring); ``fingerprint=False``: no fingerprint
      (a pass whose statistics are used at once, e.g. a correction's gradients).

    Raises :class:`StreamingUnsupportedError` (an ``ObdkError``) for a model the schedule cannot run exactly.
    """
    t_start = time.perf_counter()
    want = _check_options(stats, fisher, dtype, batch_size, fn="calibrate_streamed")
    if reduce not in ("all", "owner"):
        raise ConfigError(f"calibrate_streamed: reduce={reduce!r} is not 'all' or 'owner'")
    keep = (on_layer is None) if keep is None else bool(keep)
    backward = "cg" in want or "grad" in want
    ids, mask, src = _windows(data)
    groups, linears = _resolve_groups(model, groups)
    by_layer = _groups_by_layer(model, groups)
    runner, head = _trunk_and_head(model, linears, backward, fisher, seed)
    rank, world = dist.world()
    sweep = LayerSweep(model, ids, mask, runner=runner, windows=dist.shard(ids.shape[0], rank, world),
                       batch_size=batch_size, head=head, top=max(by_layer), bottom=min(by_layer), device=device,
                       source=source, private=on_fetch is not None, scratch_dir=scratch_dir,
                       max_host_memory=max_host_memory, budget=budget, progress=progress)
    if source is None:  # a source checks every tensor it reads; load_skeleton checked the rest
        _check_finite_weights(model)
    seed_used = int(seed) if (fisher == "true" and backward) else None
    fp, fp_read = _fingerprint(model, sweep, source, fingerprint, progress, linears, ids, mask, src, want=want,
                               dtype=dtype, fisher=fisher, seed=seed_used)
    tokens, loss_tokens = _normalisers(ids, mask, backward)
    owners = _owners(groups, by_layer, linears, reduce, owners, world, backward)
    traffic0 = dist.traffic()
    ctx = CalibrationContext()
    part = Statistics(tokens=tokens, loss_tokens=loss_tokens if backward else 0, windows=int(ids.shape[0]),
                      fisher=fisher, dtype=dtype, fingerprint=dict(fp))
    collector = _Collector(groups, by_layer, linears, want, ctx, like=part, owners=owners, rank=rank,
                           on_layer=on_layer, keep=keep, staged=sweep.place.staged, backward=backward)
    hooks: list[SweepHooks] = [collector] + ([_OnFetch(on_fetch)] if on_fetch is not None else [])
    patch = _Patch(model, collector.slots, linears, torch.zeros(0, device=sweep.device, requires_grad=True))
    try:
        with ctx.defer_symmetry():
            sweep.run(hooks)
    finally:
        patch.restore()
        collector.drop()
    out_st = collector.result(groups, input_key=collector.input_key, fingerprint=fp)
    if info is not None:
        _record(info, sweep, collector, fp_read, t_start, reduce=reduce, owners=owners, traffic0=traffic0)
    log.info("calibrate_streamed: %d windows x %d tokens, %d layers, stats %s: peak statistics %.3f GiB, host "
             "boundary buffers %.3f GiB (+%.3f GiB spilled)", ids.shape[0], ids.shape[1], len(sweep.layers),
             "+".join(want), collector.peak / 2**30, sweep.store.peak_host_bytes / 2**30,
             sweep.store.peak_spilled_bytes / 2**30)
    return out_st


def _fingerprint(model: nn.Module, sweep: LayerSweep, source, wanted: bool, progress: bool, linears, ids, mask, src,
                 **kw) -> tuple[dict, int]:
    """``(the calibration fingerprint, bytes it read from source)``; ``({}, 0)`` when not ``wanted``. A skeleton's
    fingerprint is its checkpoint's (the loaded model's): its layers are read for it."""
    if not wanted:  # (a pass whose statistics are consumed at once, e.g. a correction's gradients: no identity)
        return {}, 0
    read0 = source.read_bytes if source is not None else 0
    with sweep.place.real_parameters(progress):
        fp, _, _ = calibration_fingerprint(model, linears, ids, mask, src, **kw)
    return fp, (source.read_bytes - read0) if source is not None else 0


def _record(info: dict, sweep: LayerSweep, collector: "_Collector", fingerprint_read: int, t_start: float, *,
            reduce: str, owners: dict, traffic0: dict) -> None:
    """Fill ``info`` with what the run measured (the module docstring lists the keys)."""
    info["peak_stats_bytes"] = collector.peak
    for k, v in sweep.info().items():
        info[k] = v
        if k == "weights_read_bytes":
            info["fingerprint_read_bytes"] = fingerprint_read
    info["seconds"] = {**sweep.seconds, "total": time.perf_counter() - t_start}
    rank, world = dist.world()
    if world > 1:
        now = dist.traffic()
        info["distributed"] = {"rank": rank, "world": world, "windows": len(sweep.windows), "reduce": reduce,
                               "owners": dict(owners), **{k: now[k] - traffic0[k] for k in now}}


# =========================================================================== checks and set-up


def _groups_by_layer(model: nn.Module, groups) -> dict[int, list]:
    """``{decoder layer: [its LinearGroups]}``; a model type that does not stream, a target outside the decoder
    layers or a group over several layers is refused (:class:`StreamingUnsupportedError`, :class:`ConfigError`)."""
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    if mtype not in STREAM_TYPES:
        raise StreamingUnsupportedError(
            f"calibrate_streamed: model type {mtype!r} ({type(model).__name__}) is not one the streamed pass "
            f"supports ({', '.join(sorted(STREAM_TYPES))}); use the resident pass (stream=False, obdk compress "
            f"without --stream)")
    path, layers = decoder_layers(model)
    by_layer: dict[int, list] = {}
    for g in groups:
        idx = set()
        for name in g.names:
            rest = name[len(path) + 1:] if name.startswith(path + ".") else ""
            i = rest.split(".", 1)[0]
            if not i.isdigit() or int(i) >= len(layers):
                raise StreamingUnsupportedError(f"calibrate_streamed: target {name} is not inside a decoder layer "
                                                f"({path}.<i>); the streamed pass only calibrates decoder layers")
            idx.add(int(i))
        if len(idx) != 1:
            raise ConfigError(f"calibrate_streamed: group {g.key} spans several decoder layers")
        by_layer.setdefault(idx.pop(), []).append(g)
    return by_layer


def _trunk_and_head(model: nn.Module, linears: dict[str, nn.Linear], backward: bool, fisher: str, seed: int
                    ) -> tuple[nn.Module, Optional["_HeadLoss"]]:
    """The trunk the sweep runs and, with gradients, its :class:`_HeadLoss`; what cannot stream is refused."""
    head = plain_head(model, linears) if backward else None
    if backward and head is None:
        raise StreamingUnsupportedError(
            f"calibrate_streamed: {type(model).__name__}'s logits are not a plain Linear head over the trunk "
            f"(a logit transform in its config, a targeted or missing head); the streamed pass needs the windowed "
            f"head loss for cg/grad: use the resident pass (stream=False)")
    runner = trunk(model, linears)
    if runner is model:
        raise StreamingUnsupportedError(f"calibrate_streamed: {type(model).__name__} has no base model taking "
                                        f"input_ids that holds every target; use the resident pass (stream=False)")
    if not backward:
        return runner, None
    norm = getattr(runner, "norm", None)
    if not isinstance(norm, nn.Module):
        raise StreamingUnsupportedError(f"calibrate_streamed: {type(runner).__name__} has no final .norm; use "
                                        f"the resident pass (stream=False)")
    return runner, _HeadLoss(norm, head, fisher, seed)


def _normalisers(ids: Tensor, mask: Optional[Tensor], backward: bool) -> tuple[int, int]:
    """``(tokens, loss tokens)`` of all windows (what the resident pass all-reduces); none is a :class:`DataError`."""
    lab_all = label_positions(mask)
    tokens = int(mask.bool().sum()) if mask is not None else int(ids.numel())
    loss_tokens = int(lab_all.sum()) if lab_all is not None else int(ids.shape[0] * (ids.shape[1] - 1))
    if tokens == 0:
        raise DataError("calibrate_streamed: every token is padding; no statistics")
    if backward and loss_tokens == 0:
        raise DataError("calibrate_streamed: no position has a next-token label (windows of length 1?); C_g is undefined")
    return tokens, loss_tokens


def _owners(groups, by_layer: dict[int, list], linears: dict[str, nn.Linear], reduce: str, given: Optional[dict],
            world: int, backward: bool) -> dict[str, int]:
    """The owner rank of each group's statistics: ``given``, checked, or balanced over the whole model, layer by
    layer in the order the sweep finishes them (consecutive layers' owners alternate and keep every rank busy).
    Empty unless ``reduce="owner"``."""
    if given is not None and reduce != "owner":
        raise ConfigError("calibrate_streamed: owners= is given, and it applies only with reduce='owner'")
    owners: dict[str, int] = {}
    if reduce == "owner" and given is not None:
        for g in groups:
            if g.key not in given or not 0 <= int(given[g.key]) < world:
                raise DataError(f"calibrate_streamed: owners= gives {g.key} "
                                f"{'no rank' if g.key not in given else 'rank ' + str(given[g.key])} in a world of "
                                f"{world} ranks (a map from another model or run?)")
            owners[g.key] = int(given[g.key])
    elif reduce == "owner":
        loads = [0] * world
        for i in sorted(by_layer, reverse=backward):
            owners.update(dist.assign_owners([(g.key, sum(dist.decomposition_cost(linears[n].out_features,
                                                                                  linears[n].in_features)
                                                         for n in g.names)) for g in by_layer[i]], world, loads))
    return owners


# =========================================================================== the consumers


class _HeadLoss:
    """The backward sweep's seed: ``∂L/∂h_L`` [B, T, d] of the sum-reduced next-token loss of ``head(norm(h_L))``."""

    def __init__(self, norm: nn.Module, head: nn.Linear, fisher: str, seed: int) -> None:
        self.norm, self.head, self.fisher, self.seed = norm, head, fisher, seed
        self.modules = (norm, head)

    def __call__(self, h_last: Tensor, batch: Batch, ids: Tensor) -> Tensor:
        x = h_last.detach().requires_grad_(True)
        with torch.enable_grad():
            y = self.norm(x)
        with torch.no_grad():
            gy = head_backward(y.detach(), self.head, ids=ids, lab=label_positions(batch.mask), windows=batch.windows,
                               fisher=self.fisher, seed=self.seed)
        (gx,) = torch.autograd.grad(y, x, gy)
        return gx


class _OnFetch(SweepHooks):
    """``on_fetch(i, layer)`` of :func:`calibrate_streamed`: it may overwrite the fetched layer (a private copy)."""
    writes_weights = True

    def __init__(self, on_fetch: Callable[[int, nn.Module], Any]) -> None:
        self.on_fetch = on_fetch

    def fetch(self, i: int, layer: nn.Module) -> None:
        self.on_fetch(i, layer)


class _Collector(SweepHooks):
    """The statistics of a streamed pass, one decoder layer at a time.

    Each layer's accumulators are armed (:func:`~obdk.calibrate.stats.accumulators` on slots patched once for the
    whole run) when the phase that collects them begins (the forward sweep for ``C_x`` alone, else the backward
    sweep), checked after each batch, and when the layer is done reduced (``owners``: each group's sums to its
    owner rank only; else to every rank), normalised (:func:`~obdk.calibrate.stats.move_normalised`), handed to
    ``on_layer`` and kept (off the compute device when the layers are staged) or dropped. ``peak``: the most
    accumulator bytes held at once.
    """

    def __init__(self, groups, by_layer: dict[int, list], linears: dict[str, nn.Linear], want: Sequence[str],
                 ctx: CalibrationContext, *, like: Statistics, owners: dict[str, int], rank: int,
                 on_layer: Optional[Callable[[int, Statistics], Any]], keep: bool, staged: bool,
                 backward: bool) -> None:
        self.by_layer, self.linears, self.ctx, self.like = by_layer, linears, ctx, like
        self.slots, _, self.input_key = accumulators(groups, linears, (), like.dtype, ctx)  # armed per layer
        self.phase = "backward" if backward else "forward"
        self.kinds = tuple(s for s in ("cx", "cg", "grad") if s in want) if backward else ("cx",)
        self.owners, self.rank, self.on_layer, self.keep, self.staged = owners, rank, on_layer, keep, staged
        self.group_of = {n: g.key for g in groups for n in g.names}
        self.accs: dict[int, dict[str, Tensor]] = {}
        self.kept: list[Statistics] = []
        self.now = self.peak = 0

    def layer_start(self, i: int, phase: str) -> None:
        if phase == self.phase and i in self.by_layer:
            _, self.accs[i], _ = accumulators(self.by_layer[i], self.linears, self.kinds, self.like.dtype, self.ctx,
                                              slots=self.slots)
            self.now += sum(t.numel() * t.element_size() for t in self.accs[i].values())
            self.peak = max(self.peak, self.now)

    def batch_start(self, i: int, phase: str, batch: Batch) -> None:
        self.ctx.set_batch(batch.mask, batch.tokens)

    def batch_end(self, i: int, phase: str, batch: Batch) -> None:
        if phase == self.phase:
            for g in self.by_layer.get(i, []):
                self.slots[g.names[0]].group.check_complete()

    def layer_done(self, i: int) -> None:
        if i in self.accs:
            self._finish(i)

    def _owner(self, key: str) -> Optional[int]:
        name = key.split("/", 1)[1]
        return self.owners.get(name if key.startswith("cx/") else self.group_of[name])

    def _combine(self, key: str, t: Tensor) -> None:
        what = {"cx": "C_x", "cg": "C_g", "grad": "dL/dW"}[key.split("/", 1)[0]]
        owner = self._owner(key)
        if owner is None:
            dist.all_reduce_sum_([t])
        else:
            dist.reduce_sum_(t, owner, f"{what} of {key.split('/', 1)[1]}")

    def _mine(self, key: str) -> bool:
        owner = self._owner(key)
        return owner is None or owner == self.rank

    def _finish(self, i: int) -> None:
        """Symmetrise, reduce and normalise layer ``i``'s sums; hand them off, keep or drop them."""
        self.ctx.symmetrize()
        accs = self.accs.pop(i)
        nbytes = sum(t.numel() * t.element_size() for t in accs.values())
        like = self.like
        part = Statistics(tokens=like.tokens, loss_tokens=like.loss_tokens, windows=like.windows, fisher=like.fisher,
                          dtype=like.dtype, fingerprint=dict(like.fingerprint))
        part.input_key.update({n: g.key for g in self.by_layer[i] for n in g.names
                               if self.owners.get(g.key, self.rank) == self.rank})
        move_normalised(part, accs, combine=self._combine, keep=self._mine)  # (a non-owner's sums: gone here)
        self._disarm(i)
        if self.on_layer is not None:
            self.on_layer(i, part)
        if self.keep:  # off the compute device when the layers are staged there (it holds one layer's worth)
            self.kept.append(part.to("cpu") if self.staged else part)
        else:
            del part
            self.now -= nbytes

    def _disarm(self, i: int) -> None:
        for g in self.by_layer.get(i, []):
            self.slots[g.names[0]].group.cx = None
            for n in g.names:
                self.slots[n].cg = self.slots[n].grad = None

    def drop(self) -> None:
        """Release every accumulator (after the run, or an error in it)."""
        for i in self.by_layer:
            self._disarm(i)
        self.accs.clear()

    def result(self, groups, *, input_key: dict[str, str], fingerprint: dict) -> Statistics:
        """The kept parts as one :class:`Statistics`, in forward order as the resident pass orders them (empty
        but for its normalisers and keys without ``keep``)."""
        like = self.like
        out = Statistics(input_key=input_key, tokens=like.tokens, loss_tokens=like.loss_tokens, windows=like.windows,
                         fisher=like.fisher, dtype=like.dtype, fingerprint=fingerprint)
        merged = {kind: {} for kind in STATS}
        for p in self.kept:
            for kind in STATS:
                merged[kind].update(getattr(p, kind))
        for g in groups:
            if g.key in merged["cx"]:
                out.cx[g.key] = merged["cx"][g.key]
            for name in g.names:
                for kind in ("cg", "grad"):
                    if name in merged[kind]:
                        getattr(out, kind)[name] = merged[kind][name]
        return out
