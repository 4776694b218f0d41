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
It is a :class:`~obdk.stream.layer_files.LayerFiles`, like the kept spectra; a streamed plan gives both one
:class:`~obdk.stream.budget.HostBudget`, so that ``max_host_memory`` bounds the bytes they hold on host together.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from ..errors import NotCollectedError
from ..stream.budget import HostBudget
from ..stream.layer_files import LayerFiles
from .statistics import STATS, Statistics

__all__ = ["LayerStatistics"]


class LayerStatistics(LayerFiles):
    """Every decoder layer's :class:`Statistics`, stored one layer at a time (see the module docstring).

    ``max_host_memory`` / ``scratch_dir``: host bytes before layers go to safetensors files in
    ``scratch_dir`` (None: all on host memory). ``budget``: instead of ``max_host_memory``, a
    :class:`HostBudget` shared with other stores (a streamed plan shares one with its
    :class:`~obdk.decompose.spectrum_store.SpectrumStore`, so that ``max_host_memory`` bounds the statistics and
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
