"""Per-layer calibration statistics kept after a streamed pass, on host memory or memory-mapped scratch.

A streamed :func:`~obdk.pipeline.prepare` decomposes each decoder layer as soon as its sweep is
done. Corrections that solve with ``C_x``/``C_g`` (``kfac``) read them again *after* the
allocation, one layer at a time, during their own streamed gradient pass
(:func:`obdk.correct.steps.gradient_correct` with ``stream=``). :class:`LayerStatistics` holds the
statistics of every layer between the two, in the layout of the
:class:`~obdk.calibrate.stream.BoundaryStore`: host memory up to ``max_host_memory`` bytes,
memory-mapped (unlinked) files in ``scratch_dir`` beyond. Reading a spilled layer pages in that
layer only; the device never holds more than the layer being corrected.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from ..errors import NotCollectedError
from .statistics import STATS, Statistics

__all__ = ["LayerStatistics"]


class LayerStatistics:
    """Every decoder layer's :class:`Statistics`, stored one layer at a time (see the module docstring).

    ``max_host_memory`` / ``scratch_dir``: as for :func:`~obdk.calibrate.stream.calibrate_streamed`
    (None: all on host memory). :meth:`put` copies a layer's tensors (``cx`` [n, n], ``cg`` [m, m],
    ``grad`` [m, n]) off the compute device; :meth:`layer` returns them as a :class:`Statistics`
    (host tensors, memory-mapped where spilled); :meth:`layer_of` maps a module name to its layer.
    ``tokens``, ``loss_tokens``, ``windows``, ``fisher``, ``dtype``, ``fingerprint`` and ``input_key``
    describe the whole calibration, as the resident :class:`Statistics` would.
    """

    def __init__(self, max_host_memory: Optional[int] = None,
                 scratch_dir: Optional[str | os.PathLike] = None) -> None:
        from .stream import BoundaryStore
        self._store = BoundaryStore(max_host_memory, scratch_dir)
        self._layers: dict[int, dict[str, dict[str, object]]] = {}
        self._of: dict[str, int] = {}
        self.input_key: dict[str, str] = {}
        self.tokens = self.loss_tokens = self.windows = 0
        self.fisher = "empirical"
        self.dtype = torch.float32
        self.fingerprint: dict = {}

    # ------------------------------------------------------------------ write
    def put(self, i: int, part: Statistics) -> None:
        """Keep decoder layer ``i``'s statistics ``part`` (copied; the caller may free it)."""
        bufs: dict[str, dict[str, object]] = {kind: {} for kind in STATS}
        for kind in STATS:
            for k, t in getattr(part, kind).items():
                buf = self._store.alloc(tuple(t.shape), t.dtype)
                buf.tensor.copy_(t.detach())
                bufs[kind][k] = buf
        self._layers[int(i)] = bufs
        for name in part.input_key:
            self._of[name] = int(i)
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
        return sorted(self._layers)

    def layer_of(self, name: str) -> int:
        """The decoder layer index whose statistics hold module ``name``."""
        if name not in self._of:
            raise NotCollectedError(f"LayerStatistics: no statistics of {name!r} were kept "
                                    f"(have {len(self._of)} modules, e.g. {list(self._of)[:3]})")
        return self._of[name]

    def layer(self, i: int) -> Statistics:
        """Decoder layer ``i``'s statistics as a :class:`Statistics` (host or memory-mapped tensors)."""
        if int(i) not in self._layers:
            raise NotCollectedError(f"LayerStatistics: no statistics of decoder layer {i} (have {self.layers})")
        bufs = self._layers[int(i)]
        out = Statistics(tokens=self.tokens, loss_tokens=self.loss_tokens, windows=self.windows,
                         fisher=self.fisher, dtype=self.dtype, fingerprint=dict(self.fingerprint))
        for kind in STATS:
            getattr(out, kind).update({k: b.tensor for k, b in bufs[kind].items()})
        out.input_key.update({n: self.input_key[n] for n, j in self._of.items() if j == int(i)})
        return out

    def nbytes(self) -> int:
        """Bytes held, host and scratch together."""
        return sum(b.nbytes for d in self._layers.values() for kind in d.values() for b in kind.values())

    @property
    def spilled_bytes(self) -> int:
        """Bytes held in memory-mapped scratch files."""
        return self._store.spilled_now

    @property
    def stats(self) -> tuple[str, ...]:
        """Which statistics are held (subset of ``("cx", "cg", "grad")``)."""
        return tuple(s for s in STATS if any(d[s] for d in self._layers.values()))

    def cx_for(self, module_name: str) -> Tensor:
        """``C_x`` [n, n] of the input read by ``module_name``."""
        return self.layer(self.layer_of(module_name)).cx_for(module_name)

    def free(self) -> None:
        """Release every layer's buffers."""
        for d in self._layers.values():
            for kind in d.values():
                for b in kind.values():
                    self._store.free(b)
        self._layers.clear()
