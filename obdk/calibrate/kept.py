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
"""
from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from typing import Optional

import torch
from torch import Tensor

from ..errors import ConfigError, NotCollectedError
from .statistics import STATS, Statistics

__all__ = ["LayerStatistics"]


class LayerStatistics:
    """Every decoder layer's :class:`Statistics`, stored one layer at a time (see the module docstring).

    ``max_host_memory`` / ``scratch_dir``: host bytes before layers go to safetensors files in
    ``scratch_dir`` (None: all on host memory). :meth:`put` copies a layer's tensors (``cx`` [n, n],
    ``cg`` [m, m], ``grad`` [m, n]) to host memory or to its file; :meth:`layer` returns them as a
    :class:`Statistics` (CPU tensors; a spilled layer is read from its file, the last one read is
    cached); :meth:`layer_of` maps a module name to its layer. ``tokens``, ``loss_tokens``,
    ``windows``, ``fisher``, ``dtype``, ``fingerprint`` and ``input_key`` describe the whole
    calibration, as the resident :class:`Statistics` would. Counters: ``host_bytes``,
    ``spilled_bytes``, ``peak_host_bytes``.
    """

    def __init__(self, max_host_memory: Optional[int] = None,
                 scratch_dir: Optional[str | os.PathLike] = None) -> None:
        if max_host_memory is not None and int(max_host_memory) < 0:
            raise ConfigError(f"LayerStatistics: max_host_memory must be >= 0 bytes, got {max_host_memory}")
        if scratch_dir is not None and not os.path.isdir(scratch_dir):
            raise ConfigError(f"LayerStatistics: scratch_dir {scratch_dir} is not a directory")
        self.limit = None if max_host_memory is None else int(max_host_memory)
        self.scratch_dir = None if scratch_dir is None else str(scratch_dir)
        self._dir: Optional[str] = None
        self._finalizer = None
        self._host: dict[int, Statistics] = {}
        self._files: dict[int, tuple[str, int]] = {}  # layer -> (path, bytes)
        self._cached: Optional[tuple[int, Statistics]] = None
        self._of: dict[str, int] = {}
        self.host_bytes = self.peak_host_bytes = self.spilled_bytes = 0
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
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.limit is None or self.host_bytes + nbytes <= self.limit:
            st = Statistics(input_key=dict(part.input_key))
            for key, t in tensors.items():
                kind, name = key.split("/", 1)
                getattr(st, kind)[name] = t
            self._host[i] = st
            self.host_bytes += nbytes
            self.peak_host_bytes = max(self.peak_host_bytes, self.host_bytes)
        else:
            from safetensors.torch import save_file
            path = os.path.join(self._scratch(), f"layer-{i}.safetensors")
            try:
                save_file(tensors, path)
            except OSError as e:
                raise ConfigError(f"LayerStatistics: cannot write layer {i}'s statistics ({nbytes} bytes) to "
                                  f"scratch_dir {self.scratch_dir or tempfile.gettempdir()} ({e.strerror or e}); "
                                  f"free space there or raise max_host_memory") from e
            self._files[i] = (path, nbytes)
            self.spilled_bytes += nbytes
        del tensors
        for name in part.input_key:
            self._of[name] = i
        self.input_key.update(part.input_key)
        self.tokens, self.loss_tokens, self.windows = part.tokens, part.loss_tokens, part.windows
        self.fisher, self.dtype, self.fingerprint = part.fisher, part.dtype, dict(part.fingerprint)

    def _scratch(self) -> str:
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="obdk-kept-", dir=self.scratch_dir)
            self._finalizer = weakref.finalize(self, shutil.rmtree, self._dir, True)
        return self._dir

    # ------------------------------------------------------------------ read
    @property
    def modules(self) -> list[str]:
        """Names of the Linears covered."""
        return list(self.input_key)

    @property
    def layers(self) -> list[int]:
        """Decoder layer indices held, ascending."""
        return sorted(set(self._host) | set(self._files))

    def layer_of(self, name: str) -> int:
        """The decoder layer index whose statistics hold module ``name``."""
        if name not in self._of:
            raise NotCollectedError(f"LayerStatistics: no statistics of {name!r} were kept "
                                    f"(have {len(self._of)} modules, e.g. {list(self._of)[:3]})")
        return self._of[name]

    def layer(self, i: int) -> Statistics:
        """Decoder layer ``i``'s statistics as a :class:`Statistics` (CPU tensors)."""
        i = int(i)
        if i in self._host:
            base = self._host[i]
        elif i in self._files:
            if self._cached is not None and self._cached[0] == i:
                base = self._cached[1]
            else:
                from safetensors.torch import load_file
                self._cached = None  # the previous layer's tensors go before the next are read
                base = Statistics(input_key={n: self.input_key[n] for n, j in self._of.items() if j == i})
                for key, t in load_file(self._files[i][0]).items():
                    kind, name = key.split("/", 1)
                    getattr(base, kind)[name] = t
                self._cached = (i, base)
        else:
            raise NotCollectedError(f"LayerStatistics: no statistics of decoder layer {i} (have {self.layers})")
        return Statistics(dict(base.cx), dict(base.cg), dict(base.grad), dict(base.input_key), self.tokens,
                          self.loss_tokens, self.windows, self.fisher, self.dtype, dict(self.fingerprint))

    def nbytes(self) -> int:
        """Bytes held, host and scratch together."""
        return self.host_bytes + self.spilled_bytes

    @property
    def stats(self) -> tuple[str, ...]:
        """Which statistics are held (subset of ``("cx", "cg", "grad")``)."""
        if self._files:
            from safetensors import safe_open
            with safe_open(next(iter(self._files.values()))[0], framework="pt") as f:
                kinds = {k.split("/", 1)[0] for k in f.keys()}
        else:
            kinds = {kind for st in self._host.values() for kind in st.stats}
        return tuple(s for s in STATS if s in kinds)

    def cx_for(self, module_name: str) -> Tensor:
        """``C_x`` [n, n] of the input read by ``module_name``."""
        return self.layer(self.layer_of(module_name)).cx_for(module_name)

    def free(self) -> None:
        """Release every layer's statistics and remove the scratch files."""
        self._host.clear()
        self._files.clear()
        self._cached = None
        self.host_bytes = self.spilled_bytes = 0
        if self._finalizer is not None:
            self._finalizer()
