"""The boundary activations of a streamed pass: host buffers within a budget, beyond it memory-mapped scratch."""
from __future__ import annotations

import os
import tempfile
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..errors import ConfigError
from .budget import HostBudget, budget_of
from .scratch import ScratchStore

__all__ = ["BoundaryStore", "Buffer"]


class Buffer:
    """One boundary buffer: ``tensor`` (None once freed), its ``nbytes``, and whether it ``spilled`` to ``path``."""
    __slots__ = ("tensor", "nbytes", "spilled", "path")

    def __init__(self, tensor: Tensor, nbytes: int, spilled: bool, path: Optional[str]) -> None:
        self.tensor, self.nbytes, self.spilled, self.path = tensor, nbytes, spilled, path


class BoundaryStore(ScratchStore):
    """Host buffers for boundary activations and gradients, spilled to memory-mapped files past a budget.

    ``max_host_memory``: bytes of host buffers allowed (None: no limit); a buffer that would exceed
    it is a file in the store's private directory under ``scratch_dir`` (default the system temporary
    directory; :class:`~obdk.stream.scratch.ScratchStore`), its space reserved up front (``posix_fallocate``, so a
    full disk is an error here and not a ``SIGBUS`` later), mapped with ``torch.from_file(shared=True)`` and
    unlinked at once (the mapping keeps it alive until the buffer is freed; nothing is left behind, even after a
    crash, but the empty private directory, which :meth:`close` removes). ``budget``: a shared
    :class:`~obdk.stream.budget.HostBudget` instead of ``max_host_memory`` (a streamed plan's: its kept
    spectra and statistics and every pass's buffers draw on one limit). ``owner`` names the pass in errors.
    Counters: ``host_bytes`` (now), ``peak_host_bytes``, ``spilled_bytes`` (total ever spilled),
    ``peak_spilled_bytes``, ``files`` (buffers spilled).
    """

    prefix = "obdk-stream-"

    def __init__(self, max_host_memory: Optional[int] = None, scratch_dir: Optional[str | os.PathLike] = None,
                 *, budget: Optional[HostBudget] = None, owner: str = "calibrate_streamed") -> None:
        super().__init__(owner, scratch_dir, budget_of(owner, max_host_memory, budget))
        self.host_bytes = self.peak_host_bytes = 0
        self.spilled_now = self.spilled_bytes = self.peak_spilled_bytes = 0
        self.files = 0

    def alloc(self, shape: Sequence[int], dtype: torch.dtype) -> Buffer:
        """A buffer of ``shape`` (e.g. [N, T, d]) and ``dtype``, on host memory or memory-mapped scratch."""
        numel = 1
        for s in shape:
            numel *= int(s)
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if self.budget.take(nbytes):
            self.host_bytes += nbytes
            self.peak_host_bytes = max(self.peak_host_bytes, self.host_bytes)
            return Buffer(torch.empty(tuple(shape), dtype=dtype), nbytes, False, None)
        t, path = self._mapped(numel, nbytes, shape, dtype)
        self.files += 1
        self.spilled_now += nbytes
        self.spilled_bytes += nbytes
        self.peak_spilled_bytes = max(self.peak_spilled_bytes, self.spilled_now)
        return Buffer(t, nbytes, True, path)

    def _mapped(self, numel: int, nbytes: int, shape: Sequence[int], dtype: torch.dtype) -> tuple[Tensor, str]:
        """A memory-mapped tensor over a reserved, already unlinked file in the private directory."""
        try:
            fd, path = tempfile.mkstemp(prefix=self.prefix, suffix=".bin", dir=self.scratch())
        except OSError as e:
            raise ConfigError(f"{self._owner}: cannot create a file in scratch_dir {self.where} ({e.strerror}); "
                              f"free space there or raise max_host_memory") from e
        try:
            try:
                if nbytes:
                    os.posix_fallocate(fd, 0, nbytes)
            except OSError as e:
                raise ConfigError(f"{self._owner}: cannot reserve {nbytes} bytes in scratch_dir {self.where} "
                                  f"({e.strerror}); free space there or raise max_host_memory") from e
            finally:
                os.close(fd)
            t = torch.from_file(path, shared=True, size=max(numel, 1), dtype=dtype)[:numel].view(tuple(shape))
        finally:
            os.unlink(path)  # the mapping keeps the data; nothing is left on disk
        return t, path

    def free(self, buf: Optional[Buffer]) -> None:
        """Release ``buf`` (host bytes back to the budget; a mapping is unmapped once its tensor is gone)."""
        if buf is None or buf.tensor is None:
            return
        if buf.spilled:
            self.spilled_now -= buf.nbytes
        else:
            self.host_bytes -= buf.nbytes
            self.budget.give(buf.nbytes)
        buf.tensor = None

    def close(self) -> None:
        """Remove the private scratch directory (every buffer freed or not, its mapping stays valid)."""
        self.release_scratch()
