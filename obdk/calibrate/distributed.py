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
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch
from torch import Tensor
from ..errors import DataError

log = logging.getLogger(__name__)

__all__ = ["world", "shard", "all_reduce_sum_", "all_reduce_counts", "all_agree", "barrier"]


def _active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


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
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)


def all_reduce_counts(counts: Sequence[int], like: Optional[Tensor] = None) -> list[int]:
    """SUM all-reduce of integer counts (e.g. tokens); ``like`` picks the device. Returns the sums."""
    if not _active():
        return [int(c) for c in counts]
    t = torch.tensor([int(c) for c in counts], dtype=torch.int64, device=_count_device(like))
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return [int(v) for v in t.tolist()]


def all_agree(flag: bool, like: Optional[Tensor] = None) -> bool:
    """True only when ``flag`` is true on every rank (MIN all-reduce); ``flag`` without a group."""
    if not _active():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=_count_device(like))
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())


def barrier() -> None:
    """``torch.distributed.barrier()`` when a group is initialised."""
    if _active():
        torch.distributed.barrier()
