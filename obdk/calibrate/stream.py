"""Layer-streamed exact calibration: the statistics of :func:`~obdk.calibrate.stats.calibrate` with one
decoder layer's statistics (and one layer's autograd graph) alive at a time.

Backpropagation runs layer by layer anyway, so the whole-model pass can be rescheduled without
changing a single number (it is layer-granular checkpointing):

1. **capture** (once per batch of windows): the trunk runs with every decoder layer's ``forward``
   replaced, on the instance, by a recorder that returns its input (no layer arithmetic). That gives
   the hidden state entering layer 0 (after the embeddings and whatever scaling the model applies)
   and each layer's other call arguments (attention mask, per-layer sliding-window masks, position
   ids, rotary position embeddings, cache off) exactly as the modelling code builds them; they are
   replayed later without touching the modelling class. The recorder also checks the structure the
   schedule relies on: layer ``i+1`` receives what layer ``i`` returned, the final norm receives what
   the last layer returned and the trunk returns the norm's output. A model that does anything else
   raises :class:`StreamingUnsupportedError`, never a silent fallback.
2. **forward sweep**, layer by layer: every batch through layer ``i`` (no gradient), its input kept
   in the model dtype in a host buffer [N, T, d] (a memory-mapped file under ``scratch_dir`` once
   ``max_host_memory`` bytes would be exceeded). With ``stats=("cx",)`` alone ``C_x`` is collected
   here (the layer's Linears run through the fused :class:`~obdk.calibrate.function.CalibrationLinear`)
   and the sweep is all there is: layer ``i``'s statistics are final after its sweep, and only two
   boundary buffers (its input and its output) exist at once.
3. **head** (with ``cg``/``grad``): after the last layer, per batch, the final norm and the windowed
   LM-head loss gradient (:func:`~obdk.calibrate.head.head_backward`, the same code and the same
   true-Fisher generators ``window_generator(seed, window)`` as the resident pass) and its backward
   through the norm give ``∂L/∂h_L`` [B, T, d].
4. **backward sweep** from the top: layer ``i`` is recomputed from its stored input under the
   calibration Function (``C_x`` is collected *here*, never also in the forward sweep), the stored
   output gradient is backpropagated (``C_g``, and ``∂L/∂W`` for ``grad``), and the input gradient
   replaces it in the one gradient buffer, for layer ``i−1``. Layer ``i``'s input buffer is freed and
   its statistics are final: normalised, handed to ``on_layer(i, stats_i)`` and, unless dropped,
   kept.

Padding rows are excluded exactly as in :func:`~obdk.calibrate.stats.calibrate` (the same
:class:`~obdk.calibrate.function.CalibrationContext` row selection; padded windows get the same
``attention_mask``/``position_ids`` the resident pass feeds the trunk). The normalisers ``tokens`` and
``loss_tokens``, the keys, their forward order and the fingerprint are the resident pass's, so a
streamed :class:`Statistics` can stand in for a resident one (same cache key).

Memory: the statistics of one decoder layer (Llama-7B: 1.9 GiB in fp32) when ``on_layer`` takes them
and ``keep=False``; the boundary activations ``(layers + 1) · N · T · d`` values in the model dtype on
host (or scratch) memory; one layer's activations on the compute device. Compute: one extra forward
of every layer (the recompute) for ``cg``/``grad``, none for ``cx`` alone.

Placement (:class:`~obdk.calibrate.placement.LayerPlacement`): each sweep takes decoder layer ``i`` up
with ``fetch(i)`` and puts it down with ``release(i)``. By default the layers stay where they are (the
compute device is the model's). With ``device=`` (e.g. ``"cuda"`` for a model in host memory) each layer
is copied to the device for its work in each sweep and its host tensors put back after, and the modules
outside the decoder layers are on the device only while used (the capture; the final norm and head for
the head gradient), so the device holds one decoder layer's weights, its accumulators and one batch's
activations. With ``source=`` (a :class:`~obdk.calibrate.placement.ShardedWeights` and the skeleton of
:func:`~obdk.calibrate.placement.load_skeleton`, decoder layers on the meta device) each layer is read
from the safetensors shards when needed and dropped after, so at most one decoder layer is ever in
memory; the model fingerprint reads every weight once more (one tensor at a time) so that it equals the
loaded model's.

Supported: the model types in :data:`STREAM_TYPES` whose decoder layers hold every targeted Linear
(and, with gradients, whose head is plain, :func:`~obdk.calibrate.head.plain_head`).
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from contextlib import nullcontext
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ..errors import ConfigError, DataError, NonFiniteError, UnsupportedModelError
from ..models import decoder_layers
from ..scratch import new_file, remove_store, use_dir
from . import distributed as dist
from .function import CalibrationContext, GroupState, ModuleSlot
from .head import accepts_position_ids, forward_kwargs, head_backward, label_positions, plain_head, trunk
from .memory import _resolve_groups
from .placement import LayerPlacement, ShardedWeights
from .statistics import STATS, Statistics
from .stats import (_check_finite_weights, _check_options, _Patch, _windows,
                    calibration_fingerprint)

log = logging.getLogger(__name__)

__all__ = ["calibrate_streamed", "StreamingUnsupportedError", "STREAM_TYPES", "BoundaryStore"]

#: model types the streamed schedule is verified on (tests: llama, qwen2, mistral, phi3) or whose
#: trunk is the same loop (qwen3); the capture checks the structure at run time in any case
STREAM_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3"})


class StreamingUnsupportedError(UnsupportedModelError):
    """The layer-streamed calibration cannot run this model exactly (the message says why and what to use)."""


# =========================================================================== boundary buffers


class _Buffer:
    __slots__ = ("tensor", "nbytes", "spilled", "path")

    def __init__(self, tensor: Tensor, nbytes: int, spilled: bool, path: Optional[str]) -> None:
        self.tensor, self.nbytes, self.spilled, self.path = tensor, nbytes, spilled, path


class BoundaryStore:
    """Host buffers for boundary activations and gradients, spilled to memory-mapped files past a budget.

    ``max_host_memory``: bytes of host buffers allowed (None: no limit); a buffer that would exceed
    it is a file in ``scratch_dir`` (default the system temporary directory), its space reserved up
    front (``posix_fallocate``, so a full disk is an error here and not a ``SIGBUS`` later), mapped
    with ``torch.from_file(shared=True)`` and unlinked at once (the mapping keeps it alive until the
    buffer is freed; nothing is left behind, even after a crash). ``budget``: a shared
    :class:`~obdk.calibrate.kept.HostBudget` instead of ``max_host_memory`` (a streamed plan's: its kept
    spectra and statistics and every pass's buffers draw on one limit). Counters: ``host_bytes`` (now),
    ``peak_host_bytes``, ``spilled_bytes`` (total ever spilled), ``peak_spilled_bytes``.
    """

    def __init__(self, max_host_memory: Optional[int] = None, scratch_dir: Optional[str | os.PathLike] = None,
                 *, budget=None) -> None:
        from .kept import _budget_of
        self.budget = _budget_of("calibrate_streamed", max_host_memory, budget)
        self.dir = str(scratch_dir) if scratch_dir is not None else None
        if self.dir is not None and not os.path.isdir(self.dir):
            raise ConfigError(f"calibrate_streamed: scratch_dir {self.dir} is not a directory")
        use_dir(self.dir, "calibrate_streamed: scratch_dir")  # writable (a real write), stale stores swept
        self.host_bytes = self.peak_host_bytes = 0
        self.spilled_now = self.spilled_bytes = self.peak_spilled_bytes = 0
        self.files = 0

    def alloc(self, shape: Sequence[int], dtype: torch.dtype) -> _Buffer:
        """A buffer of ``shape`` (e.g. [N, T, d]) and ``dtype``, on host memory or memory-mapped scratch."""
        numel = 1
        for s in shape:
            numel *= int(s)
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if self.budget.take(nbytes):
            self.host_bytes += nbytes
            self.peak_host_bytes = max(self.peak_host_bytes, self.host_bytes)
            return _Buffer(torch.empty(tuple(shape), dtype=dtype), nbytes, False, None)
        where = self.dir or tempfile.gettempdir()
        fd, path = new_file("obdk-stream-", ".bin", where, "calibrate_streamed")  # (removed on SIGTERM/SIGHUP)
        try:
            try:
                if nbytes:
                    os.posix_fallocate(fd, 0, nbytes)
            except OSError as e:
                raise ConfigError(f"calibrate_streamed: cannot reserve {nbytes} bytes in scratch_dir {where} "
                                  f"({e.strerror}); free space there or raise max_host_memory") from e
            finally:
                os.close(fd)
            t = torch.from_file(path, shared=True, size=max(numel, 1), dtype=dtype)[:numel].view(tuple(shape))
        finally:
            remove_store(path)  # the mapping keeps the data; nothing is left on disk
        self.files += 1
        self.spilled_now += nbytes
        self.spilled_bytes += nbytes
        self.peak_spilled_bytes = max(self.peak_spilled_bytes, self.spilled_now)
        return _Buffer(t, nbytes, True, path)

    def free(self, buf: Optional[_Buffer]) -> None:
        """Release ``buf`` (host bytes back to the budget; a mapping is unmapped once its tensor is gone)."""
        if buf is None or buf.tensor is None:
            return
        if buf.spilled:
            self.spilled_now -= buf.nbytes
        else:
            self.host_bytes -= buf.nbytes
            self.budget.give(buf.nbytes)
        buf.tensor = None


# =========================================================================== capture


def _hidden_arg(args: tuple, kwargs: dict) -> Tensor:
    h = args[0] if args else kwargs.get("hidden_states")
    if not torch.is_tensor(h):
        raise StreamingUnsupportedError("calibrate_streamed: a decoder layer was called without a hidden-state "
                                        "tensor as its first argument or hidden_states=")
    return h


def _call_layer(layer: nn.Module, call: tuple[tuple, dict], hidden: Tensor) -> Tensor:
    """Replay ``layer`` on ``hidden`` [B, T, d] with its captured other arguments; its output hidden state."""
    args, kwargs = call
    res = layer(hidden, *args[1:], **kwargs) if args else layer(**{**kwargs, "hidden_states": hidden})
    out = res[0] if isinstance(res, (tuple, list)) else res
    if not torch.is_tensor(out) or out.shape != hidden.shape:
        raise StreamingUnsupportedError(f"calibrate_streamed: {type(layer).__name__} returned "
                                        f"{type(out).__name__} {tuple(getattr(out, 'shape', ()))} for an input "
                                        f"{tuple(hidden.shape)}; the streamed pass needs a layer that maps hidden "
                                        f"states to hidden states of the same shape")
    return out


def _capture(runner: nn.Module, layers: nn.ModuleList, norm: Optional[nn.Module], kwargs: dict,
             wrap_tuple: bool) -> tuple[Optional[Tensor], list[tuple[tuple, dict]], Optional[str]]:
    """One trunk call with recording stubs for the layers: ``(hidden0 [B, T, d], calls, problem)``.

    ``calls[i] = (args, kwargs)`` of layer ``i`` with the hidden state left out (``args[0]`` None).
    ``problem`` is None when the chain layer→layer→norm→trunk output held, else what broke it.
    """
    n = len(layers)
    calls: list[Optional[tuple[tuple, dict]]] = [None] * n
    received: list[Optional[Tensor]] = [None] * n
    returned: list[Optional[Tensor]] = [None] * n
    counts = [0] * n
    seen_norm: list[tuple[Any, Any]] = []

    def make(i):
        def stub(*args, **kw):
            h = _hidden_arg(args, kw)
            counts[i] += 1
            received[i] = h
            kwd = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in kw.items() if k != "hidden_states"}
            calls[i] = (((None,) + tuple(args[1:])) if args else (), kwd)
            out = h.view(h.shape)  # a fresh tensor object: identity tells us where it goes next
            returned[i] = out
            return (out,) if wrap_tuple else out
        return stub

    saved = []
    for i, layer in enumerate(layers):
        saved.append(("forward" in layer.__dict__, layer.__dict__.get("forward")))
        layer.forward = make(i)
    hook = None
    if norm is not None:
        hook = norm.register_forward_hook(lambda m, a, kw, o: seen_norm.append((_hidden_arg(a, kw), o)),
                                          with_kwargs=True)
    try:
        with torch.no_grad():
            res = runner(**kwargs)
    except StreamingUnsupportedError as e:
        return None, [], str(e).replace("calibrate_streamed: ", "")
    finally:
        for layer, (had, old) in zip(layers, saved):
            if had:
                layer.forward = old
            else:
                layer.__dict__.pop("forward", None)
        if hook is not None:
            hook.remove()
    if counts != [1] * n:
        return None, [], f"decoder layers were called {counts} times in one forward (expected once each)"
    for i in range(1, n):
        if received[i] is not returned[i - 1]:
            return None, [], (f"layer {i} did not receive the output of layer {i - 1} (the trunk transforms the "
                              f"hidden states between layers, or returns {'tuples' if wrap_tuple else 'tensors'})")
    if norm is not None:
        out = res.last_hidden_state if hasattr(res, "last_hidden_state") else res[0]
        if len(seen_norm) != 1 or seen_norm[0][0] is not returned[-1] or seen_norm[0][1] is not out:
            return None, [], ("the trunk's output is not its final norm applied to the last layer's output "
                              f"(norm called {len(seen_norm)} times)")
    return received[0], calls, None  # type: ignore[return-value]


# =========================================================================== the pass


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

    ``data``: as for ``calibrate`` (``.input_ids`` [N, T] and ``.attention_mask`` [N, T] or None, a dict,
    or a LongTensor [N, T]); attention-mask zeros are padding. ``stats``: any of ``"cx"``, ``"cg"``,
    ``"grad"``; ``fisher``/``seed``: ``"empirical"`` or ``"true"`` (labels drawn from
    ``window_generator(seed, window)``, as today); ``batch_size``: windows per layer call; ``dtype``:
    float32 or float64 accumulators. Returns :class:`Statistics` with ``cx[key]`` [n, n] (``/tokens``),
    ``cg[name]`` [m, m] (``/loss_tokens``), ``grad[name]`` [m, n] (summed), equal to ``calibrate``'s up
    to rounding (same keys in the same order, same normalisers and fingerprint).

    ``scratch_dir``/``max_host_memory``: the boundary activations ([N, T, d] per layer boundary, model
    dtype) live in host memory up to ``max_host_memory`` bytes (None: unbounded) and in memory-mapped
    files in ``scratch_dir`` beyond (:class:`BoundaryStore`); or, with ``budget`` (a
    :class:`~obdk.calibrate.kept.HostBudget` shared with the stores a streamed plan keeps), up to what is
    left of it. ``on_layer(i, stats_i)``: called when
    decoder layer ``i``'s statistics are final (top layer first when gradients are collected,
    bottom first for ``cx`` alone), with a :class:`Statistics` holding that layer's tensors only
    (normalised; ``Statistics.merge`` of all parts is the full result). ``keep``: keep each layer's
    statistics in the result (default: True without ``on_layer``, False with one, so that only one
    layer's statistics are ever held). ``groups``: the ``LinearGroup`` list to target (default
    :func:`obdk.models.linear_groups`; every group must lie inside a decoder layer). ``info``: a dict
    filled with what the run measured (``peak_stats_bytes``: the most accumulator bytes held at once;
    ``peak_host_bytes``, ``spilled_bytes``, ``scratch_files``; ``seconds`` per phase; under a process
    group ``distributed``: this rank's ``rank``, ``world``, ``windows``, ``owners`` (group key → rank,
    ``reduce="owner"``) and the :func:`~obdk.calibrate.distributed.traffic` counters of this call:
    ``reduce_bytes``, ``all_reduce_bytes``, ``share_bytes``, ``object_bytes``, ``collective_seconds``,
    ``collectives``).

    ``reduce``: how the ranks of a process group combine a finished layer's accumulators. ``"all"``
    (default): all-reduced, every rank's parts and result hold every statistic. ``"owner"``: each shared-input
    group has an owner rank (:func:`~obdk.calibrate.distributed.assign_owners`, balanced by
    :func:`~obdk.calibrate.distributed.decomposition_cost` over the whole model, the same on every rank); its
    ``C_x`` and its Linears' ``C_g``/``∂L/∂W`` are SUM-reduced to the owner only, and every other rank frees
    them at once. ``on_layer`` then receives, on each rank, a part holding only the groups that rank owns
    (possibly none; it is still called, so that a collective inside it runs on every rank), and the
    result holds only the owned statistics. Without a group (or with one rank) both are the same.
    ``owners``: with ``reduce="owner"``, a given map ``{group key: rank}`` (e.g. a previous pass's
    ``info["distributed"]["owners"]``, so that a correction's gradient pass reduces each ``∂L/∂W`` to the rank
    that kept that matrix's statistics) instead of the balanced one; it must name every group.

    ``device``: the compute device of the sweeps (None: where the model's input embeddings are, today's
    behaviour). When the model lives elsewhere (host memory, ``device="cuda"``), each decoder layer is copied
    onto ``device`` for its work in the forward sweep and again in the backward sweep and its host tensors put
    back afterwards (at most one decoder layer on ``device``); embeddings, rotary embedding, final norm and head
    are there only while used; accumulators are allocated on ``device``; boundary buffers stay in host memory
    (:class:`BoundaryStore`). ``source``: a :class:`~obdk.calibrate.placement.ShardedWeights` over the checkpoint
    of ``model``, a skeleton from :func:`~obdk.calibrate.placement.load_skeleton` (decoder-layer parameters on
    the meta device): layer ``i``'s tensors are read from the shards onto ``device`` (or the model's device) in
    each parameter's dtype when layer ``i`` is needed, and replaced by the meta parameters after, so at most one
    decoder layer is materialized at a time. ``on_fetch(i, layer)``: called each time a sweep takes up decoder
    layer ``i`` (after its weights are on the compute device), before it runs; it may overwrite them (e.g. a
    correction installing ``b @ a``) and the overwrite is gone at the release: with ``on_fetch`` every fetched
    layer is a private copy (one layer's extra memory), so the model never sees it. ``on_layer(i, part)`` is called
    while layer ``i`` is still on the compute device, so it may read ``model.get_submodule(name).weight``
    (e.g. to decompose it); with ``keep``, each part is moved to host memory after ``on_layer`` when ``device``
    is not the model's. Every parameter is back where it was (the same tensors) when the call returns or
    raises. ``info`` then also holds ``peak_layers_materialized`` (most decoder layers fetched at once: 1),
    ``weights_read_bytes`` (stored bytes the sweeps read from ``source``; 0 without), ``fingerprint_read_bytes``
    (the fingerprint's read of every meta parameter), ``weights_moved_bytes`` (bytes copied to ``device``) and
    ``device``. ``fingerprint=False``: the result's fingerprint is empty (a pass whose statistics are used at
    once and never cached, such as a correction's gradient pass; it saves the fingerprint's hash of every
    weight, for a skeleton a read of every decoder layer).

    Raises :class:`StreamingUnsupportedError` (an ``ObdkError``) for a model the schedule cannot run
    exactly (see the module docstring); the weights are frozen for the run and restored afterwards.
    """
    t_start = time.perf_counter()
    want = _check_options(stats, fisher, dtype, batch_size, fn="calibrate_streamed")
    if reduce not in ("all", "owner"):
        raise ConfigError(f"calibrate_streamed: reduce={reduce!r} is not 'all' or 'owner'")
    keep = (on_layer is None) if keep is None else bool(keep)
    backward = "cg" in want or "grad" in want

    ids, mask, src = _windows(data)
    groups, linears = _resolve_groups(model, groups)
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    if mtype not in STREAM_TYPES:
        raise StreamingUnsupportedError(
            f"calibrate_streamed: model type {mtype!r} ({type(model).__name__}) is not one the streamed pass "
            f"supports ({', '.join(sorted(STREAM_TYPES))}); use the resident pass (stream=False, obdk compress "
            f"without --stream)")
    path, layers = decoder_layers(model)
    layer_of: dict[str, int] = {}
    for g in groups:
        for name in g.names:
            rest = name[len(path) + 1:] if name.startswith(path + ".") else ""
            idx = rest.split(".", 1)[0]
            if not idx.isdigit() or int(idx) >= len(layers):
                raise StreamingUnsupportedError(f"calibrate_streamed: target {name} is not inside a decoder layer "
                                                f"({path}.<i>); the streamed pass only calibrates decoder layers")
            layer_of[name] = int(idx)
        if len({layer_of[n] for n in g.names}) != 1:
            raise ConfigError(f"calibrate_streamed: group {g.key} spans several decoder layers")
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
    norm = getattr(runner, "norm", None) if backward else None
    if backward and not isinstance(norm, nn.Module):
        raise StreamingUnsupportedError(f"calibrate_streamed: {type(runner).__name__} has no final .norm; use "
                                        f"the resident pass (stream=False)")
    place = LayerPlacement(model, device=device, source=source, on_fetch=on_fetch, private=on_fetch is not None)
    if source is None:  # a source checks every tensor it reads; load_skeleton checked the rest
        _check_finite_weights(model)
    rank, world = dist.world()
    seed_used = int(seed) if (fisher == "true" and backward) else None
    read0 = source.read_bytes if source is not None else 0
    if fingerprint:
        with place.real_parameters(progress):  # a skeleton's fingerprint is its checkpoint's (the loaded model's)
            fingerprint, _, _ = calibration_fingerprint(model, linears, ids, mask, src, want=want, dtype=dtype,
                                                        fisher=fisher, seed=seed_used)
    else:  # (a pass whose statistics are consumed at once, e.g. a correction's gradients: no identity to keep)
        fingerprint = {}
    fingerprint_read = (source.read_bytes - read0) if source is not None else 0

    # normalisers of all windows (what the resident pass all-reduces)
    lab_all = label_positions(mask)
    tokens = int(mask.bool().sum()) if mask is not None else int(ids.numel())
    loss_tokens = int(lab_all.sum()) if lab_all is not None else int(ids.shape[0] * (ids.shape[1] - 1))
    if tokens == 0:
        raise DataError("calibrate_streamed: every token is padding; no statistics")
    if backward and loss_tokens == 0:
        raise DataError("calibrate_streamed: no position has a next-token label (windows of length 1?); C_g is undefined")

    mine = dist.shard(ids.shape[0], rank, world)
    bs = int(batch_size)
    batches = [mine[s:s + bs] for s in range(0, len(mine), bs)]
    starts = [s for s in range(0, len(mine), bs)]
    in_dev = place.device
    accepts_pos = accepts_position_ids(runner)
    by_layer: dict[int, list] = {}
    for g in groups:
        by_layer.setdefault(layer_of[g.names[0]], []).append(g)
    top = len(layers) - 1 if backward else max(by_layer)
    bottom = min(by_layer)
    # owner of each group (C_x and its Linears' C_g/grad): balanced over the whole model, layer by layer in the
    # order the sweep finishes them, so consecutive layers' owners alternate and keep every rank busy
    given, owners = owners, {}
    if given is not None and reduce != "owner":
        raise ConfigError("calibrate_streamed: owners= is given, and it applies only with reduce='owner'")
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
    traffic0 = dist.traffic()

    # ---------------------------------------------------------------- slots (accumulators set per layer)
    ctx = CalibrationContext()
    slots: dict[str, ModuleSlot] = {}
    gstate: dict[str, GroupState] = {}
    input_key: dict[str, str] = {}
    for g in groups:
        gs = gstate[g.key] = GroupState(g.key, g.names, None, ctx)
        for name in g.names:
            slots[name] = ModuleSlot(name, gs, None, None)
            input_key[name] = g.key
    live = {"now": 0, "peak": 0}
    kept: list[Statistics] = []
    seconds = {"capture": 0.0, "forward sweep": 0.0, "backward sweep": 0.0}

    def arm(i: int, kinds: Sequence[str]) -> None:
        """Allocate layer ``i``'s accumulators of ``kinds`` on its Linears' devices."""
        for g in by_layer.get(i, []):
            first = linears[g.names[0]]
            if "cx" in kinds:
                gstate[g.key].cx = torch.zeros(first.in_features, first.in_features, dtype=dtype,
                                               device=first.weight.device)
            for name in g.names:
                m = linears[name]
                if "cg" in kinds:
                    slots[name].cg = torch.zeros(m.out_features, m.out_features, dtype=dtype, device=m.weight.device)
                if "grad" in kinds:
                    slots[name].grad = torch.zeros(m.out_features, m.in_features, dtype=dtype, device=m.weight.device)
        live["now"] += _layer_acc_bytes(i)
        live["peak"] = max(live["peak"], live["now"])

    def _layer_acc_bytes(i: int) -> int:
        tot = 0
        for g in by_layer.get(i, []):
            ts = [gstate[g.key].cx] + [t for n in g.names for t in (slots[n].cg, slots[n].grad)]
            tot += sum(t.numel() * t.element_size() for t in ts if t is not None)
        return tot

    def finish(i: int) -> None:
        """Symmetrise, reduce and normalise layer ``i``'s accumulators; hand them off, keep or drop them."""
        if i not in by_layer:
            return
        ctx.symmetrize()
        part = Statistics(tokens=tokens, loss_tokens=loss_tokens if backward else 0, windows=int(ids.shape[0]),
                          fisher=fisher, dtype=dtype, fingerprint=dict(fingerprint))
        nbytes = _layer_acc_bytes(i)
        for g in by_layer[i]:
            gs = gstate[g.key]
            owner = owners.get(g.key)
            mine_g = owner is None or owner == rank
            if gs.cx is not None:
                _combine(gs.cx, owner, f"C_x of {g.key}")
                if mine_g:
                    part.cx[g.key] = gs.cx.div_(tokens)
            for name in g.names:
                if mine_g:
                    part.input_key[name] = g.key
                s = slots[name]
                if s.cg is not None:
                    _combine(s.cg, owner, f"C_g of {name}")
                    if mine_g:
                        part.cg[name] = s.cg.div_(loss_tokens)
                if s.grad is not None:
                    _combine(s.grad, owner, f"dL/dW of {name}")
                    if mine_g:
                        part.grad[name] = s.grad
                s.cg = s.grad = None  # a non-owner's reduced buffers are garbage: gone here
            gs.cx = None
        if on_layer is not None:
            on_layer(i, part)
        if keep:  # off the compute device when the layers are staged there (it holds one layer's worth)
            kept.append(part.to("cpu") if place.staged else part)
        else:
            del part
            live["now"] -= nbytes

    def check(i: int) -> None:
        for g in by_layer.get(i, []):
            gstate[g.key].check_complete()

    store = BoundaryStore(max_host_memory, scratch_dir, budget=budget)
    from tqdm.auto import tqdm
    anchor = torch.zeros(0, device=in_dev, requires_grad=True)
    patch = _Patch(model, slots, linears, anchor)
    bufs: dict[int, Any] = {}
    gbuf = None
    try:
        with ctx.defer_symmetry():
            # ------------------------------------------------------------ capture
            t0 = time.perf_counter()
            calls: list[list[tuple[tuple, dict]]] = [[] for _ in layers]
            T = ids.shape[1]
            with place.outside():  # embeddings, rotary embedding, final norm on the compute device
                for k, idx in enumerate(batches):
                    b_ids = ids[idx].to(in_dev)
                    b_mask = mask[idx].to(in_dev) if mask is not None else None
                    kw = forward_kwargs(b_ids, b_mask, accepts_pos)
                    h0, cl, problem = _capture(runner, layers, norm, kw, wrap_tuple=False)
                    if problem is not None:
                        h0, cl, problem2 = _capture(runner, layers, norm, kw, wrap_tuple=True)
                        if problem2 is not None:
                            raise StreamingUnsupportedError(
                                f"calibrate_streamed: {type(runner).__name__} does not run its decoder layers as a "
                                f"plain chain ({problem}); use the resident pass (stream=False)")
                    if k == 0:
                        d = h0.shape[-1]
                        hdtype = h0.dtype
                        bufs[0] = store.alloc((len(mine), T, d), hdtype)
                    bufs[0].tensor[starts[k]:starts[k] + len(idx)].copy_(h0)
                    cl = place.stage(cl)  # masks, rotary phases: host memory when the layers are staged
                    for i in range(len(layers)):
                        calls[i].append(cl[i])
            seconds["capture"] = time.perf_counter() - t0

            # ------------------------------------------------------------ forward sweep
            t0 = time.perf_counter()
            n_fwd = top + 1
            with tqdm(total=n_fwd * len(batches), desc=f"obdk stream [forward sweep] layer 1/{n_fwd}", unit="batch",
                      disable=not progress, leave=False) as bar:
                for i in range(n_fwd):
                    bar.set_description(f"obdk stream [forward sweep] layer {i + 1}/{n_fwd}")
                    layer = place.fetch(i)
                    collect = (not backward) and i in by_layer
                    if collect:
                        arm(i, ("cx",))
                    last = backward and i == top
                    need_out = not last and i < top  # cx alone: the top target layer's output is not needed
                    out_buf = store.alloc(bufs[i].tensor.shape, hdtype) if need_out else None
                    if last:
                        gbuf = store.alloc(bufs[i].tensor.shape, hdtype)
                    with place.outside(norm, head) if last else nullcontext():  # the head gradient's modules
                        for k, idx in enumerate(batches):
                            s, e = starts[k], starts[k] + len(idx)
                            b_mask = mask[idx].to(in_dev) if mask is not None else None
                            h = bufs[i].tensor[s:e].to(in_dev)
                            ctx.set_batch(b_mask, h.shape[0] * T)
                            with torch.no_grad():
                                out = _call_layer(layer, place.to_device(calls[i][k]), h)
                            if collect:
                                check(i)
                            if last:
                                gbuf.tensor[s:e].copy_(_head_grad(norm, head, out, ids[idx].to(in_dev), b_mask, idx,
                                                                  fisher, seed))
                            elif need_out:
                                out_buf.tensor[s:e].copy_(out)
                            del out, h
                            bar.update(1)
                    if collect:
                        finish(i)  # on_layer while layer i is still on the compute device
                    place.release(i)
                    if need_out:
                        if not bool(torch.isfinite(out_buf.tensor).all()):
                            raise NonFiniteError(f"calibrate_streamed: non-finite hidden states after decoder layer "
                                                 f"{i} ({path}.{i})")
                        bufs[i + 1] = out_buf
                    if not backward:  # nothing comes back down: the input of layer i is done
                        store.free(bufs.pop(i))
            seconds["forward sweep"] = time.perf_counter() - t0

            # ------------------------------------------------------------ backward sweep
            if backward:
                t0 = time.perf_counter()
                n_bwd = top - bottom + 1
                kinds = [s for s in ("cx", "cg", "grad") if s in want]
                with tqdm(total=n_bwd * len(batches), desc=f"obdk stream [backward sweep] layer {top + 1}/{top + 1}",
                          unit="batch", disable=not progress, leave=False) as bar:
                    for i in range(top, bottom - 1, -1):
                        bar.set_description(f"obdk stream [backward sweep] layer {i + 1}/{top + 1}")
                        layer = place.fetch(i)
                        if i in by_layer:
                            arm(i, kinds)
                        for k, idx in enumerate(batches):
                            s, e = starts[k], starts[k] + len(idx)
                            b_mask = mask[idx].to(in_dev) if mask is not None else None
                            h = bufs[i].tensor[s:e].to(in_dev)
                            gout = gbuf.tensor[s:e].to(in_dev)
                            need_in = i > bottom
                            if need_in:
                                h = h.detach().requires_grad_(True)
                            ctx.set_batch(b_mask, h.shape[0] * T)
                            with torch.enable_grad():
                                out = _call_layer(layer, place.to_device(calls[i][k]), h)
                                check(i)
                                if out.requires_grad:
                                    torch.autograd.backward(out, gout)
                            del out
                            if need_in:
                                gbuf.tensor[s:e].copy_(h.grad if h.grad is not None else torch.zeros_like(h))
                            del h, gout
                            bar.update(1)
                        finish(i)  # on_layer while layer i is still on the compute device
                        place.release(i)
                        store.free(bufs.pop(i))
                seconds["backward sweep"] = time.perf_counter() - t0
    finally:
        place.close()
        patch.restore()
        for b in list(bufs.values()) + [gbuf]:
            store.free(b)
        for s in slots.values():
            s.cg = s.grad = None
        for gs in gstate.values():
            gs.cx = None

    out_st = Statistics(input_key=input_key, tokens=tokens, loss_tokens=loss_tokens if backward else 0,
                        windows=int(ids.shape[0]), fisher=fisher, dtype=dtype, fingerprint=fingerprint)
    if keep:  # forward order, as the resident pass orders them
        merged = {kind: {} for kind in STATS}
        for p in kept:
            for kind in STATS:
                merged[kind].update(getattr(p, kind))
        for g in groups:
            if g.key in merged["cx"]:
                out_st.cx[g.key] = merged["cx"][g.key]
            for name in g.names:
                for kind in ("cg", "grad"):
                    if name in merged[kind]:
                        getattr(out_st, kind)[name] = merged[kind][name]
    if info is not None:
        info.update({"peak_stats_bytes": live["peak"], "peak_host_bytes": store.peak_host_bytes,
                     "spilled_bytes": store.spilled_bytes, "peak_spilled_bytes": store.peak_spilled_bytes,
                     "scratch_files": store.files, "layers": len(layers), "batches": len(batches),
                     "peak_layers_materialized": place.peak_fetched, "weights_read_bytes": place.read_bytes,
                     "fingerprint_read_bytes": fingerprint_read, "weights_moved_bytes": place.moved_bytes,
                     "device": str(place.device),
                     "seconds": {**seconds, "total": time.perf_counter() - t_start}})
        if world > 1:
            now = dist.traffic()
            info["distributed"] = {"rank": rank, "world": world, "windows": len(mine), "reduce": reduce,
                                   "owners": dict(owners), **{k: now[k] - traffic0[k] for k in now}}
    log.info("calibrate_streamed: %d windows x %d tokens, %d layers, stats %s: peak statistics %.3f GiB, host "
             "boundary buffers %.3f GiB (+%.3f GiB spilled)", ids.shape[0], ids.shape[1], len(layers), "+".join(want),
             live["peak"] / 2**30, store.peak_host_bytes / 2**30, store.peak_spilled_bytes / 2**30)
    return out_st


def _combine(t: Tensor, owner: Optional[int], name: str) -> None:
    """Sum ``t`` over the ranks: onto every rank (``owner`` None) or onto ``owner`` only (``name`` for errors)."""
    if owner is None:
        dist.all_reduce_sum_([t])
    else:
        dist.reduce_sum_(t, owner, name)


def _head_grad(norm: nn.Module, head: nn.Linear, h_last: Tensor, ids: Tensor, mask: Optional[Tensor],
               windows: Sequence[int], fisher: str, seed: int) -> Tensor:
    """``∂L/∂h_L`` [B, T, d] of the sum-reduced next-token loss of ``head(norm(h_L))`` (``h_L`` [B, T, d])."""
    x = h_last.detach().requires_grad_(True)
    with torch.enable_grad():
        y = norm(x)
    with torch.no_grad():
        gy = head_backward(y.detach(), head, ids=ids, lab=label_positions(mask), windows=windows, fisher=fisher,
                           seed=seed)
    (gx,) = torch.autograd.grad(y, x, gy)
    return gx
