"""Per-layer files: one dict of tensors per decoder layer, on host memory within a budget, else one safetensors file.

A streamed :func:`~obdk.pipeline.prepare` keeps, between its sweep and the allocation or the corrections, each
decoder layer's spectra (:class:`obdk.decompose.spectrum_store.SpectrumStore`) and, for a correction, its
statistics (:class:`obdk.calibrate.layer_statistics.LayerStatistics`); a streamed correction keeps each layer's
corrected factors (:class:`obdk.correct.factor_store.FactorStore`). All three are :class:`LayerFiles`: host memory
up to what their shared :class:`~obdk.stream.budget.HostBudget` allows, beyond it one safetensors file per layer in
the store's private scratch directory (:class:`~obdk.stream.scratch.ScratchStore`), read back one layer at a time.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional

from torch import Tensor

from ..errors import ConfigError, DataError, MissingFileError
from .budget import HostBudget, budget_of
from .scratch import ScratchStore

__all__ = ["LayerFiles"]


class LayerFiles(ScratchStore):
    """One dict of CPU tensors per decoder layer: on host memory within a :class:`HostBudget`, beyond it a
    safetensors file per layer in a private ``{prefix}*`` directory under ``scratch_dir``.

    The part the kept stores share (:class:`~obdk.calibrate.layer_statistics.LayerStatistics`,
    :class:`~obdk.decompose.spectrum_store.SpectrumStore`, :class:`~obdk.correct.factor_store.FactorStore`), on the
    one scratch-store base (:class:`~obdk.stream.scratch.ScratchStore`).
    ``owner`` names the store in errors. :meth:`_keep` takes a layer's tensors (CPU, contiguous, owning
    their storage); :meth:`_tensors` gives them back, a spilled layer read from its file (the last one read
    is cached, so a layer-by-layer walk reads each file once; ``files_read`` counts the reads). The
    directory is created at the first spill and removed by :meth:`free` or when the store is
    garbage-collected. Counters: ``host_bytes`` (this store's bytes on host, within the budget),
    ``peak_host_bytes``, ``spilled_bytes``, ``files_read``.
    """

    prefix = "obdk-kept-"

    def __init__(self, owner: str, max_host_memory: Optional[int], scratch_dir, budget: Optional[HostBudget]) -> None:
        super().__init__(owner, scratch_dir, budget_of(owner, max_host_memory, budget))
        self._host_layers: dict[int, dict[str, Tensor]] = {}
        self._files: dict[int, tuple[str, int]] = {}  # layer -> (path, bytes)
        self._cached: Optional[tuple[int, dict[str, Tensor]]] = None
        self.host_bytes = self.peak_host_bytes = self.spilled_bytes = self.files_read = 0

    def _keep(self, i: int, tensors: Mapping[str, Tensor], what: str) -> bool:
        """Keep layer ``i``'s ``tensors`` (``what`` names them in errors); True when kept on host."""
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.budget.take(nbytes):
            self._host_layers[i] = dict(tensors)
            self.host_bytes += nbytes
            self.peak_host_bytes = max(self.peak_host_bytes, self.host_bytes)
            return True
        from safetensors import SafetensorError
        from safetensors.torch import save_file
        path = os.path.join(self.scratch(), f"layer-{i}.safetensors")
        try:
            save_file(dict(tensors), path)
        except (OSError, SafetensorError) as e:  # (safetensors reports a vanished directory as its own error)
            gone = "" if os.path.isdir(self.scratch_path) else f"; its store {self.scratch_path} was removed during the run"
            raise ConfigError(f"{self._owner}: cannot write {what} ({nbytes} bytes) to scratch_dir "
                              f"{self.where} ({getattr(e, 'strerror', None) or e}{gone}); "
                              f"free space there or raise max_host_memory") from e
        self._files[i] = (path, nbytes)
        self.spilled_bytes += nbytes
        return False

    def _held(self, i: int) -> bool:
        return i in self._host_layers or i in self._files

    def _tensors(self, i: int, what: str, want=None) -> dict[str, Tensor]:
        """Layer ``i``'s tensors; a spilled layer is read from its file (cached). ``want``: ``{key: (shape, dtype)}``
        the file must hold, checked (a missing or corrupt file raises an error naming the file and ``what``)."""
        if i in self._host_layers:
            return self._host_layers[i]
        if self._cached is not None and self._cached[0] == i:
            return self._cached[1]
        path = self._files[i][0]
        self._cached = None  # the previous layer's tensors go before the next are read
        if not os.path.isfile(path):
            raise MissingFileError(f"{self._owner}: the scratch file {path} holding {what} is gone (was the scratch "
                                   f"directory cleaned while the plan was alive?); prepare again")
        from safetensors.torch import load_file
        try:
            got = load_file(path)
        except Exception as e:  # safetensors raises its own SafetensorError (not an OSError) on a bad header
            raise DataError(f"{self._owner}: the scratch file {path} holding {what} cannot be read ({e}); "
                            f"prepare again") from e
        for key, (shape, dtype) in (want or {}).items():
            t = got.get(key)
            if t is None or tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                have = "missing" if t is None else f"{t.dtype} {list(t.shape)}"
                raise DataError(f"{self._owner}: the scratch file {path} holding {what} is corrupt: tensor {key} is "
                                f"{have}, expected {dtype} {list(shape)}; prepare again")
        self.files_read += 1
        self._cached = (i, got)
        return got

    def drop_cache(self) -> None:
        """Forget the last layer read back from its file (its host memory is released when no one holds it)."""
        self._cached = None

    def _release(self, i: int) -> int:
        """Release layer ``i``'s tensors alone: its host bytes back to the budget, its scratch file removed (the
        others stay). Returns the bytes released (0 if the layer is not held). Reading it afterwards is the
        caller's to refuse."""
        if i in self._host_layers:
            nbytes = sum(t.numel() * t.element_size() for t in self._host_layers.pop(i).values())
            self.host_bytes -= nbytes
            self.budget.give(nbytes)
            return nbytes
        if i in self._files:
            path, nbytes = self._files.pop(i)
            if self._cached is not None and self._cached[0] == i:
                self._cached = None
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            self.spilled_bytes -= nbytes
            return nbytes
        return 0

    def nbytes(self) -> int:
        """Bytes held, host and scratch together."""
        return self.host_bytes + self.spilled_bytes

    def free(self) -> None:
        """Release every layer's tensors (host bytes back to the budget) and remove the scratch files."""
        self._host_layers.clear()
        self._files.clear()
        self._cached = None
        self.budget.give(self.host_bytes)
        self.host_bytes = self.spilled_bytes = 0
        self.release_scratch()
