"""The one base of every store that spills to scratch files.

A streamed plan keeps bytes on host memory within its :class:`~obdk.stream.budget.HostBudget` and spills what
does not fit to scratch: each layer's kept spectra, statistics and corrected factors
(:class:`~obdk.stream.layer_files.LayerFiles`: one safetensors file per layer) and each pass's boundary activations
(:class:`~obdk.stream.boundary.BoundaryStore`: memory-mapped files, unlinked at once). Every such store is a
:class:`ScratchStore`: it owns one private directory under ``scratch_dir`` (default the system temporary
directory), made when it first spills (:meth:`ScratchStore.scratch`) and removed by
:meth:`ScratchStore.release_scratch` or when the store is garbage-collected. The directory is made and removed
through :mod:`obdk.scratch`, which names it ``<prefix><pid>@<host>.<random>``, locks it while the process lives,
removes it on SIGTERM/SIGHUP and sweeps the stale ones of dead processes when a directory is first used.
"""
from __future__ import annotations

import os
import tempfile
import weakref
from typing import Optional

from ..errors import ConfigError
from ..scratch import new_store, remove_store, use_dir
from .budget import HostBudget

__all__ = ["ScratchStore"]


class ScratchStore:
    """Host bytes within a :class:`HostBudget`, the rest in files in a private directory under ``scratch_dir``.

    ``owner`` names the store in errors; ``budget`` is the (possibly shared) budget it draws on; ``scratch_dir``
    must be an existing directory (None: the system temporary directory), else :class:`ConfigError` naming it.
    Subclasses set ``prefix`` (the private directory's name starts with it).
    """

    prefix = "obdk-scratch-"

    def __init__(self, owner: str, scratch_dir, budget: HostBudget) -> None:
        self._owner = owner
        self.budget = budget
        if scratch_dir is not None and not os.path.isdir(scratch_dir):
            raise ConfigError(f"{owner}: scratch_dir {scratch_dir} is not a directory")
        use_dir(scratch_dir, f"{owner}: scratch_dir")  # writable (a real write), stale stores swept (obdk.scratch)
        self.scratch_dir: Optional[str] = None if scratch_dir is None else str(scratch_dir)
        self.scratch_path: Optional[str] = None  #: the private directory, once made
        self._finalizer: Optional[weakref.finalize] = None

    @property
    def limit(self) -> Optional[int]:
        """The byte limit of the (possibly shared) budget; None: unbounded."""
        return self.budget.limit

    @property
    def where(self) -> str:
        """The directory the private scratch directory goes in (for messages)."""
        return self.scratch_dir or tempfile.gettempdir()

    def scratch(self) -> str:
        """The store's private directory, made on first call; removed by :meth:`release_scratch` or with the store."""
        if self.scratch_path is None:
            # named with pid@host and locked while this process lives: removed on SIGTERM/SIGHUP, and swept by a
            # later run once this process is gone (obdk.scratch)
            self.scratch_path = new_store(self.prefix, self.scratch_dir, self._owner)
            self._finalizer = weakref.finalize(self, remove_store, self.scratch_path)
        return self.scratch_path

    def release_scratch(self) -> None:
        """Remove the private directory and everything in it (nothing when none was made)."""
        if self._finalizer is not None:
            self._finalizer()
        self.scratch_path = self._finalizer = None
