"""Per-layer calibration statistics kept after a streamed pass, on host memory or in scratch safetensors files.

A streamed :func:`~obdk.pipeline.prepare` decomposes each decoder layer as soon as its sweep is
done. Corrections that re-truncate in the layer's whitening or solve with ``C_x``/``C_g`` (``zs``,
``kfac``) read them again *after* the allocation, one layer at a time, during their own streamed
gradient pass (:func:`obdk.correct.steps.gradient_correct` with ``stream=``).
:class:`LayerStatistics` holds every layer's statistics between the two: on host memory up to
``max_host_memory`` bytes, beyond that one safetensors file per layer in a private directory
under ``scratch_dir`` (default the system temporary directory), read back one layer at a time, so
host memory holds the budget plus the one layer being corrected. The directory is removed when
the store is freed or garbage-collected (a killed process leaves an ``obdk-kept-*`` directory).

The same machinery (:class:`LayerFiles`) keeps each layer's spectra
(:class:`obdk.decompose.kept.SpectrumStore`). Both draw on a :class:`HostBudget`: a streamed plan
gives its statistics and its spectra one budget, so that ``max_host_memory`` bounds the bytes they
hold on host *together* (the boundary buffers of each streamed pass have their own, see
:class:`obdk.calibrate.stream.BoundaryStore`).
"""
from __future__ import annotations

import math
import numbers
import os
import shutil
import tempfile
import weakref
from typing import Mapping, Optional

import torch
from torch import Tensor

from ..errors import ConfigError, DataError, MissingFileError, NotCollectedError
from .statistics import STATS, Statistics

__all__ = ["HostBudget", "LayerFiles", "LayerStatistics"]


class HostBudget:
    """Bytes of host memory that several kept stores draw on together.

    ``limit``: bytes allowed (None: no limit; an int ≥ 0, else :class:`ConfigError` naming ``option``
    and ``owner``). A store calls :meth:`take` before keeping ``nbytes`` on host memory: True (counted)
    if the sum of everything taken stays within ``limit``, else False and the store writes those bytes
    to its scratch files instead; :meth:`give` returns bytes a store frees. ``used``: bytes held now by
    every store on this budget; ``peak``: the most held at once, so ``peak <= limit`` always.
    """

    def __init__(self, limit: Optional[int] = None, *, option: str = "max_host_memory",
                 owner: str = "HostBudget") -> None:
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, numbers.Real)
                                  or not math.isfinite(limit) or limit < 0):
            raise ConfigError(f"{owner}: {option} must be >= 0 bytes, got {limit!r}")
        self.limit = None if limit is None else int(limit)
        self.used = self.peak = 0

    def take(self, nbytes: int) -> bool:
        """Count ``nbytes`` against the budget if they fit (True), else change nothing (False)."""
        nbytes = int(nbytes)
        if self.limit is not None and self.used + nbytes > self.limit:
            return False
        self.used += nbytes
        self.peak = max(self.peak, self.used)
        return True

    def give(self, nbytes: int) -> None:
        """Return ``nbytes`` a store no longer holds."""
        self.used = max(0, self.used - int(nbytes))

    def __repr__(self) -> str:
        return f"HostBudget(limit={self.limit}, used={self.used}, peak={self.peak})"


def _budget_of(owner: str, max_host_memory, budget: Optional[HostBudget]) -> HostBudget:
    if budget is None:
        return HostBudget(max_host_memory, owner=owner)
    if max_host_memory is not None:
        raise ConfigError(f"{owner}: give max_host_memory or budget (a shared HostBudget), not both")
    if not isinstance(budget, HostBudget):
        raise ConfigError(f"{owner}: budget must be a HostBudget, got {type(budget).__name__}")
    return budget


class LayerFiles:
    """One dict of CPU tensors per decoder layer: on host memory within a :class:`HostBudget`, beyond it a
    safetensors file per layer in a private ``{prefix}*`` directory under ``scratch_dir``.

    The part the kept stores share (:class:`LayerStatistics`, :class:`obdk.decompose.kept.SpectrumStore`).
    ``owner`` names the store in errors. :meth:`_keep` takes a layer's tensors (CPU, contiguous, owning
    their storage); :meth:`_tensors` gives them back, a spilled layer read from its file (the last one read
    is cached, so a layer-by-layer walk reads each file once; ``files_read`` counts the reads). The
    directory is created at the first spill and removed by :meth:`free` or when the store is
    garbage-collected. Counters: ``host_bytes`` (this store's bytes on host, within the budget),
    ``peak_host_bytes``, ``spilled_bytes``, ``files_read``.
    """

    _prefix = "obdk-kept-"

    def __init__(self, owner: str, max_host_memory: Optional[int], scratch_dir, budget: Optional[HostBudget]) -> None:
        self._owner = owner
        self.budget = _budget_of(owner, max_host_memory, budget)
        if scratch_dir is not None and not os.path.isdir(scratch_dir):
            raise ConfigError(f"{owner}: scratch_dir {scratch_dir} is not a directory")
        self.scratch_dir = None if scratch_dir is None else str(scratch_dir)
        self._dir: Optional[str] = None
        self._finalizer = None
        self._host_layers: dict[int, dict[str, Tensor]] = {}
        self._files: dict[int, tuple[str, int]] = {}  # layer -> (path, bytes)
        self._cached: Optional[tuple[int, dict[str, Tensor]]] = None
        self.host_bytes = self.peak_host_bytes = self.spilled_bytes = self.files_read = 0

    @property
    def limit(self) -> Optional[int]:
        """The byte limit of the (possibly shared) budget; None: unbounded."""
        return self.budget.limit

    def _keep(self, i: int, tensors: Mapping[str, Tensor], what: str) -> bool:
        """Keep layer ``i``'s ``tensors`` (``what`` names them in errors); True when kept on host."""
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.budget.take(nbytes):
            self._host_layers[i] = dict(tensors)
            self.host_bytes += nbytes
            self.peak_host_bytes = max(self.peak_host_bytes, self.host_bytes)
            return True
        from safetensors.torch import save_file
        path = os.path.join(self._scratch(), f"layer-{i}.safetensors")
        try:
            save_file(dict(tensors), path)
        except OSError as e:
            raise ConfigError(f"{self._owner}: cannot write {what} ({nbytes} bytes) to scratch_dir "
                              f"{self.scratch_dir or tempfile.gettempdir()} ({e.strerror or e}); "
                              f"free space there or raise max_host_memory") from e
        self._files[i] = (path, nbytes)
        self.spilled_bytes += nbytes
        return False

    def _scratch(self) -> str:
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix=self._prefix, dir=self.scratch_dir)
            self._finalizer = weakref.finalize(self, shutil.rmtree, self._dir, True)
        return self._dir

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
        if self._finalizer is not None:
            self._finalizer()


class LayerStatistics(LayerFiles):
    """Every decoder layer's :class:`Statistics`, stored one layer at a time (see the module docstring).

    ``max_host_memory`` / ``scratch_dir``: host bytes before layers go to safetensors files in
    ``scratch_dir`` (None: all on host memory). ``budget``: instead of ``max_host_memory``, a
    :class:`HostBudget` shared with other stores (a streamed plan shares one with its
    :class:`~obdk.decompose.kept.SpectrumStore`, so that ``max_host_memory`` bounds the statistics and
    the spectra together). :meth:`put` copies a layer's tensors (``cx`` [n, n],
    ``cg`` [m, m], ``grad`` [m, n]) to host memory or to its file; :meth:`layer` returns them as a
    :class:`Statistics` (CPU tensors; a spilled layer is read from its file, the last one read is
    cached); :meth:`layer_of` maps a module name to its layer. ``tokens``, ``loss_tokens``,
    ``windows``, ``fisher``, ``dtype``, ``fingerprint`` and ``input_key`` describe the whole
    calibration, as the resident :class:`Statistics` would. Counters: ``host_bytes``,
    ``spilled_bytes``, ``peak_host_bytes``, ``files_read``.
    """

    def __init__(self, max_host_memory: Optional[int] = None,
                 scratch_dir: Optional[str | os.PathLike] = None, *, budget: Optional[HostBudget] = None) -> None:
        super().__init__("LayerStatistics", max_host_memory, scratch_dir, budget)
        self._of: dict[str, int] = {}
        self.input_key: dict[str, str] = {}
        self.tokens = self.loss_tokens = self.windows = 0
        self.fisher = "empirical"
        self.dtype = torch.float32
        self.fingerprint: dict = {}

    # ------------------------------------------------------------------ write
    def put(self, i: int, part: Statistics) -> None:
        """Keep decoder layer ``i``'s statistics ``part`` (copied off its device; the caller may free it)."""
        i = int(i)
        tensors = {f"{kind}/{k}": t.detach().to("cpu", copy=True).contiguous()
                   for kind in STATS for k, t in getattr(part, kind).items()}
        self._keep(i, tensors, f"decoder layer {i}'s statistics")
        del tensors
        for name in part.input_key:
            self._of[name] = i
        self.input_key.update(part.input_key)
        self.tokens, self.loss_tokens, self.windows = part.tokens, part.loss_tokens, part.windows
        self.fisher, self.dtype, self.fingerprint = part.fisher, part.dtype, dict(part.fingerprint)

    # ------------------------------------------------------------------ read
    @property
    def modules(self) -> list[str]:
        """Names of the Linears covered."""
        return list(self.input_key)

    @property
    def layers(self) -> list[int]:
        """Decoder layer indices held, ascending."""
        return sorted(set(self._host_layers) | set(self._files))

    def layer_of(self, name: str) -> int:
        """The decoder layer index whose statistics hold module ``name``."""
        if name not in self._of:
            raise NotCollectedError(f"LayerStatistics: no statistics of {name!r} were kept "
                                    f"(have {len(self._of)} modules, e.g. {list(self._of)[:3]})")
        return self._of[name]

    def layer(self, i: int) -> Statistics:
        """Decoder layer ``i``'s statistics as a :class:`Statistics` (CPU tensors)."""
        i = int(i)
        if not self._held(i):
            raise NotCollectedError(f"LayerStatistics: no statistics of decoder layer {i} (have {self.layers})")
        st = Statistics(input_key={n: self.input_key[n] for n, j in self._of.items() if j == i},
                        tokens=self.tokens, loss_tokens=self.loss_tokens, windows=self.windows, fisher=self.fisher,
                        dtype=self.dtype, fingerprint=dict(self.fingerprint))
        for key, t in self._tensors(i, f"decoder layer {i}'s statistics").items():
            kind, name = key.split("/", 1)
            getattr(st, kind)[name] = t
        return st

    @property
    def stats(self) -> tuple[str, ...]:
        """Which statistics are held (subset of ``("cx", "cg", "grad")``)."""
        if self._files:
            from safetensors import safe_open
            with safe_open(next(iter(self._files.values()))[0], framework="pt") as f:
                kinds = {k.split("/", 1)[0] for k in f.keys()}
        else:
            kinds = {key.split("/", 1)[0] for ts in self._host_layers.values() for key in ts}
        return tuple(s for s in STATS if s in kinds)

    def cx_for(self, module_name: str) -> Tensor:
        """``C_x`` [n, n] of the input read by ``module_name``."""
        return self.layer(self.layer_of(module_name)).cx_for(module_name)
