"""Data-parallel calibration over ``torch.distributed``.

When a process group is initialised, rank ``r`` of ``W`` calibrates windows ``i`` with
``i % W == r`` (:func:`shard`), and before normalising every raw accumulator (sums of
``xᵀx``, ``gᵀg``, ``gᵀx``) and the token counts are all-reduced with SUM
(:func:`all_reduce_sum_`, :func:`all_reduce_counts`). The statistics of W ranks therefore
equal those of one process up to the order of fp32 summation; every rank ends with the
full result. Works with gloo (CPU tensors) and NCCL (CUDA tensors: the accumulators live on
each rank's GPU and the counts are sent from the accumulators' device).

Per-window randomness (the true-Fisher label sampling) is seeded by the window index, not
by the rank, so the sampled labels do not depend on the number of ranks.

**Owner reduce** (the layer-streamed pipeline, ``calibrate_streamed(..., reduce="owner")``): every
shared-input group of Linears gets an owner rank (:func:`assign_owners`, greedy longest-processing-time
on the cost of its eigenproblems, :func:`decomposition_cost`, the same on every rank); a group's
``C_x`` and its Linears' ``C_g``/``∂L/∂W`` are SUM-reduced to that rank only (:func:`reduce_sum_`),
which decomposes them. :func:`share_spectra` then moves what the rest of the run needs: every
target's eigenvalues and metadata to every rank (the allocation runs everywhere on the same numbers),
its ordered factors to rank 0 (the writer) only. Bytes and seconds inside collectives are counted per
process (:func:`traffic`).

**Corrections** (``zs``, ``kfac``, ``zs+kfac`` after an owner-reduced streamed calibration): each rank keeps
only the statistics of the matrices it owns. Rank 0 truncates every target at its allocated rank (only it
holds the factors) and :func:`broadcast_factors` gives every rank the truncated ``a`` [r, n], ``b`` [m, r]
(r columns only, not the full spectra), so that every rank sets ``W_r = b a`` in its model. Each step's
streamed gradient pass shards the windows as the calibration does and reduces each ``∂L/∂W`` to its owner
(the calibration's owner map); the owner takes the step and re-truncates with the statistics it kept, and
:func:`broadcast_factors` gives every rank the corrected factors, predicted loss and damping (the next
step's pass runs at them; after the last step every rank holds the same compressed factors).

:func:`init_from_env` / :func:`destroy` set up and tear down the default group under ``torchrun``;
:func:`alone` hides the group (work that only rank 0 does, e.g. applying and saving).
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import pickle
import time
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch
from torch import Tensor

from ..errors import ConfigError, DataError, ObdkError

log = logging.getLogger(__name__)

__all__ = ["world", "shard", "all_reduce_sum_", "all_reduce_counts", "all_agree", "barrier", "decomposition_cost",
           "assign_owners", "reduce_sum_", "share_spectra", "broadcast_factors", "same_on_every_rank",
           "all_gather_objects", "traffic",
           "alone", "init_from_env", "destroy", "CollectiveError"]


class CollectiveError(ObdkError, RuntimeError):
    """A collective failed on this rank: another rank stopped (its own error names the cause) or did not
    answer within the process group's timeout (``obdk compress --dist-timeout``)."""

_HIDDEN = [False]  # inside alone(): the group exists but this process works on its own

# bytes this process sent in each kind of collective (its own payload: a reduce counts the tensor once on each
# non-owner, an all-gather counts the pickled object once per peer) and seconds spent inside collective calls
# (waiting for the slowest peer plus the transfer)
_TRAFFIC = {"reduce_bytes": 0, "all_reduce_bytes": 0, "share_bytes": 0, "broadcast_bytes": 0, "object_bytes": 0,
            "collective_seconds": 0.0,
            "collectives": 0}


def _active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and not _HIDDEN[0]


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group; ``(0, 1)`` when none is initialised."""
    if not _active():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def shard(n: int, rank: int, world_size: int) -> list[int]:
    """Window indices ``i < n`` with ``i % world_size == rank`` (rank ``rank``'s share)."""
    if not 0 <= rank < world_size:
        raise DataError(f"shard: rank {rank} is outside world of size {world_size}")
    return list(range(rank, n, world_size))


def _count_device(like: Optional[Tensor]) -> torch.device:
    if like is not None:
        return like.device
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum_(tensors: Sequence[Tensor]) -> None:
    """In place SUM all-reduce of every tensor (each rank passes the same names in the same order).

    No-op without a process group. Tensors are reduced one at a time, so no extra
    buffer larger than one accumulator is ever allocated.
    """
    if not _active():
        return
    for t in tensors:
        with _timed("an all-reduce"):
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        _TRAFFIC["all_reduce_bytes"] += t.numel() * t.element_size()


def all_reduce_counts(counts: Sequence[int], like: Optional[Tensor] = None) -> list[int]:
    """SUM all-reduce of integer counts (e.g. tokens); ``like`` picks the device. Returns the sums."""
    if not _active():
        return [int(c) for c in counts]
    t = torch.tensor([int(c) for c in counts], dtype=torch.int64, device=_count_device(like))
    with _timed("an all-reduce of counts"):
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return [int(v) for v in t.tolist()]


def all_agree(flag: bool, like: Optional[Tensor] = None) -> bool:
    """True only when ``flag`` is true on every rank (MIN all-reduce); ``flag`` without a group."""
    if not _active():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=_count_device(like))
    with _timed("an all-reduce of flags"):
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())


def barrier() -> None:
    """``torch.distributed.barrier()`` when a group is initialised."""
    if _active():
        with _timed("a barrier"):
            torch.distributed.barrier()


# =========================================================================== accounting


@contextlib.contextmanager
def _timed(what: str = "a collective") -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    except RuntimeError as e:  # gloo/NCCL: a peer closed its connection, or the timeout passed
        if isinstance(e, ObdkError):
            raise
        first = " ".join(str(e).split("\n")[0].split())[:300]
        raise CollectiveError(f"{what} failed on rank {torch.distributed.get_rank()}: another rank stopped or did "
                              f"not answer in time (see its own error); {type(e).__name__}: {first}") from e
    finally:
        _TRAFFIC["collective_seconds"] += time.perf_counter() - t0
        _TRAFFIC["collectives"] += 1


def traffic() -> dict:
    """This process's collective counters so far (a copy): ``reduce_bytes`` (accumulator bytes it sent in
    owner reduces: each non-owner counts its tensor once), ``all_reduce_bytes`` (accumulator bytes it put into
    all-reduces, once per tensor: the resident pass and ``reduce="all"``), ``share_bytes`` (factor bytes it sent in
    :func:`share_spectra`), ``broadcast_bytes`` (factor bytes it broadcast as the source in
    :func:`broadcast_factors`, once per tensor), ``object_bytes`` (pickled metadata it sent to its peers),
    ``collective_seconds``
    (wall time inside collective calls: waiting for the slowest rank plus the transfer) and ``collectives``
    (calls). Logical payload bytes, not bytes on the wire (the backend's algorithm may relay them)."""
    return dict(_TRAFFIC)


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Inside, :func:`world` is ``(0, 1)`` and every helper here is a no-op: work one rank does on its own
    (applying and saving on the writer) runs as in one process, with no collective that would wait for
    ranks that are not there. The process group itself stays initialised."""
    before = _HIDDEN[0]
    _HIDDEN[0] = True
    try:
        yield
    finally:
        _HIDDEN[0] = before


def init_from_env(device: str = "cpu", timeout_s: float = 1800.0) -> tuple[bool, str]:
    """Initialise the default process group from ``torchrun``'s environment when ``WORLD_SIZE`` > 1.

    ``device``: the run's device (``"cpu"`` → gloo, ``"cuda"``/``"cuda:i"`` → NCCL; a bare ``"cuda"``
    becomes ``cuda:$LOCAL_RANK``); ``timeout_s``: seconds a collective may wait for a peer before it fails
    (a rank that died does not leave the others hanging past it). Returns ``(initialised here, device)``;
    ``(False, device)`` when ``WORLD_SIZE`` is unset or 1, or a group already exists. A missing
    ``RANK``/``MASTER_ADDR``/``MASTER_PORT`` or a bad ``timeout_s`` raises :class:`ConfigError` naming it.
    """
    ws = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if ws <= 1 or (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False, device
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise ConfigError(f"WORLD_SIZE={ws} but {', '.join(missing)} unset: launch with torchrun "
                          f"(torchrun --nproc-per-node {ws} -m obdk ...)")
    if not timeout_s > 0:
        raise ConfigError(f"--dist-timeout {timeout_s}: must be > 0 seconds")
    dev = torch.device(device)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=float(timeout_s)))
    log.info("process group: %s, rank %d of %d, device %s", backend, torch.distributed.get_rank(), ws, dev)
    return True, str(dev)


def destroy() -> None:
    """Destroy the default process group if one is initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# =========================================================================== owners


def decomposition_cost(m: int, n: int) -> int:
    """Work of one target's full decomposition (weight [m, n]), in units of multiply-adds, roughly:
    ``p³ + p·q²`` with ``p = min(m, n)``, ``q = max(m, n)`` (the p×p root and eigen-solve, and the Gram
    formed through the q-side covariance). Only the ratios matter (owner balance)."""
    p, q = min(int(m), int(n)), max(int(m), int(n))
    return p ** 3 + p * q * q


def assign_owners(costs: Sequence[tuple[str, int]], world_size: int,
                  loads: Optional[list] = None) -> dict[str, int]:
    """Owner rank of each item: greedy longest-processing-time (largest cost first, to the least loaded rank).

    ``costs``: ``[(key, cost)]`` (e.g. group key → summed :func:`decomposition_cost` of its Linears);
    ``world_size``: ranks; ``loads``: per-rank loads so far (length ``world_size``, updated in place, so
    that calls layer after layer balance the whole run). Ties go to the earlier key and the lower rank:
    every rank computes the same map. Returns ``{key: rank}``.
    """
    w = int(world_size)
    if w < 1:
        raise DataError(f"assign_owners: world_size {world_size} must be >= 1")
    if loads is None:
        loads = [0] * w
    elif len(loads) != w:
        raise DataError(f"assign_owners: {len(loads)} loads for a world of {w}")
    out: dict[str, int] = {}
    for j in sorted(range(len(costs)), key=lambda j: (-costs[j][1], j)):
        r = min(range(w), key=lambda q: (loads[q], q))
        out[costs[j][0]] = r
        loads[r] += costs[j][1]
    return {k: out[k] for k, _ in costs}


def reduce_sum_(t: Tensor, dst: int, name: str = "a tensor") -> None:
    """SUM-reduce ``t`` (any shape) onto rank ``dst`` (in place there; elsewhere ``t`` is left undefined: free it).

    No-op without a process group. Counts ``t``'s bytes in ``traffic()["reduce_bytes"]`` on every
    non-destination rank; ``name`` (e.g. ``"C_x of model.layers.3.mlp"``) names it in a
    :class:`CollectiveError`.
    """
    if not _active():
        return
    with _timed(f"the reduce of {name} to rank {dst}"):
        torch.distributed.reduce(t, dst=int(dst), op=torch.distributed.ReduceOp.SUM)
    if torch.distributed.get_rank() != int(dst):
        _TRAFFIC["reduce_bytes"] += t.numel() * t.element_size()


def all_gather_objects(obj: Any) -> list:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without a group. Counted in ``object_bytes``."""
    rank, w = world()
    if w == 1:
        return [obj]
    out: list = [None] * w
    _TRAFFIC["object_bytes"] += len(pickle.dumps(obj)) * (w - 1)
    with _timed("an all-gather"):
        torch.distributed.all_gather_object(out, obj)
    return out


def same_on_every_rank(obj: Any, what: str) -> None:
    """Raise :class:`DataError` naming ``what`` and the first rank whose ``obj`` differs from rank 0's."""
    objs = all_gather_objects(obj)
    for r, o in enumerate(objs):
        if o != objs[0]:
            raise DataError(f"{what} differs between rank 0 and rank {r} (the ranks did not compute the same "
                            f"run; they must see the same model, data and options)")


# =========================================================================== spectra


_FACTORS = ("factor_b", "factor_a")


def share_spectra(local: Mapping[str, Any], weights: Mapping[str, Tensor], *, writer: int = 0) -> dict[str, Any]:
    """After the owners' decompositions of one layer: every target's spectrum where the run needs it.

    ``local``: ``{name: Spectrum}`` this rank decomposed (the targets it owns; maybe none), each with
    ``eigenvalues`` [k], ``factor_b`` [m, k'], ``factor_a`` [k', n] and ``weight`` [m, n];
    ``weights``: ``{name: weight [m, n]}`` from this rank's own model for at least every name any rank
    decomposed (a spectrum's ``weight`` is the original tensor, which every rank holds, so it never
    travels). Every rank calls this with its own ``local`` (a collective).

    Returns ``{name: Spectrum}`` of every target any rank decomposed, in rank order then each owner's
    order. The eigenvalues and metadata (method, solver, damping, numerical rank, rtol, kept) are exact
    copies on every rank (one all-gather of pickled metadata); the factors are exact copies on rank
    ``writer`` (point-to-point sends from each owner). Elsewhere (an owner's own factors included, once
    sent) ``factor_b``/``factor_a`` are tensors on the ``meta`` device: shape and dtype only, so a rank
    holds no factors beyond the layer it is decomposing (scores that need every factor on every rank,
    such as BSI's, cannot run on such spectra: the pipeline all-reduces for them instead).
    Eigenvalues and factors are placed on the device of the target's weight. Without a group:
    ``dict(local)``.
    """
    import dataclasses
    rank, w = world()
    if w == 1:
        return dict(local)
    metas = {}
    for name, sp in local.items():
        metas[name] = dataclasses.replace(
            sp, eigenvalues=sp.eigenvalues.detach().cpu(), weight=torch.empty(0, device="meta"),
            **{f: torch.empty(getattr(sp, f).shape, dtype=getattr(sp, f).dtype, device="meta") for f in _FACTORS})
    everyone = all_gather_objects(metas)
    out: dict[str, Any] = {}
    for owner, got in enumerate(everyone):
        for name, meta in got.items():
            if name not in weights:
                raise DataError(f"share_spectra: rank {owner} decomposed {name}, which rank {rank} has no weight for")
            wt = weights[name]
            if rank != writer:  # shapes only: sent below if this rank owns it, never needed here
                fac = {f: getattr(meta, f) for f in _FACTORS}
                if owner == rank:
                    for f in _FACTORS:
                        t = getattr(local[name], f).contiguous()
                        _TRAFFIC["share_bytes"] += t.numel() * t.element_size()
                        with _timed(f"the send of {name}.{f}"):
                            torch.distributed.send(t, dst=writer)
            elif owner == rank:
                fac = {f: getattr(local[name], f) for f in _FACTORS}
            else:
                fac = {f: torch.empty(getattr(meta, f).shape, dtype=getattr(meta, f).dtype, device=wt.device)
                       for f in _FACTORS}
                for f in _FACTORS:
                    with _timed(f"the receive of {name}.{f}"):
                        torch.distributed.recv(fac[f], src=owner)
            ev = local[name].eigenvalues if owner == rank else meta.eigenvalues.to(wt.device)
            out[name] = dataclasses.replace(meta, eigenvalues=ev, weight=local[name].weight if owner == rank else
                                            wt.detach(), **fac)
    return out


def broadcast_factors(local: Mapping[str, tuple], src: Mapping[str, int], like: Mapping[str, Tensor]
                      ) -> dict[str, tuple]:
    """Every target's factors on every rank, each broadcast from the rank that computed it (a collective).

    ``local``: ``{name: (a [r, n], b [m, r], *rest)}`` for the names this rank is the source of
    (``src[name] == rank``; maybe none), ``rest`` picklable (e.g. the predicted loss, the damping used);
    ``src``: ``{name: rank}`` for every target, the same on every rank (its order is the order of the
    broadcasts); ``like``: ``{name: tensor}`` whose device receives ``name``'s factors (its weight [m, n]).

    One all-gather of pickled metadata (shapes, dtypes and ``rest``), then one broadcast of each factor from
    its source, counted there once in ``traffic()["broadcast_bytes"]``. Returns ``{name: (a, b, *rest)}`` in the
    order of ``src``, exact copies of the source's on every rank. A source that did not provide a name of
    ``src`` raises :class:`DataError` naming it and the rank. Without a group: ``local``'s entries in
    ``src``'s order.
    """
    rank, w = world()
    if w == 1:
        missing = [n for n in src if n not in local]
        if missing:
            raise DataError(f"broadcast_factors: no factors of {missing[0]} (and {len(missing) - 1} more) on rank 0")
        return {n: tuple(local[n]) for n in src}
    metas = {n: (tuple(v[0].shape), v[0].dtype, tuple(v[1].shape), v[1].dtype, tuple(v[2:]))
             for n, v in local.items() if int(src.get(n, -1)) == rank}
    everyone = all_gather_objects(metas)
    out: dict[str, tuple] = {}
    for name, s in src.items():
        s = int(s)
        if name not in everyone[s]:
            raise DataError(f"broadcast_factors: rank {s} holds no factors of {name}, which it is the source of")
        sa, da, sb, db, rest = everyone[s][name]
        if s == rank:
            a, b = local[name][0].contiguous(), local[name][1].contiguous()
        else:
            dev = like[name].device
            a, b = torch.empty(sa, dtype=da, device=dev), torch.empty(sb, dtype=db, device=dev)
        for f, t in (("a", a), ("b", b)):
            with _timed(f"the broadcast of {name}.{f} from rank {s}"):
                torch.distributed.broadcast(t, src=s)
            if s == rank:
                _TRAFFIC["broadcast_bytes"] += t.numel() * t.element_size()
        out[name] = (a, b, *rest)
    return out
