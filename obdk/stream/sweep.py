"""The layer sweep: a model's calibration windows run one decoder layer at a time, with hooks for its consumers.

Backpropagation runs layer by layer anyway, so a whole-model pass can be rescheduled without changing a
single number (it is layer-granular checkpointing). A :class:`LayerSweep` does the scheduling and nothing
else; what is computed along the way belongs to its consumers (:class:`SweepHooks`: the statistics of
:func:`obdk.calibrate.stream.calibrate_streamed`, a correction installing its truncations, a per-layer
healing step):

1. **capture** (once per batch of windows, :mod:`obdk.stream.capture`): the trunk runs with every decoder
   layer's ``forward`` replaced by a recorder; the hidden state entering layer 0 goes to a boundary buffer
   and each layer's other call arguments are kept to be replayed. A model whose trunk is not a plain chain
   of its layers raises :class:`~obdk.errors.StreamingUnsupportedError`, never a silent fallback.
2. **forward sweep**, layer by layer: every batch through layer ``i`` (no gradient), its input kept in the
   model dtype in a host buffer [N, T, d] (memory-mapped scratch once the budget is spent,
   :class:`~obdk.stream.boundary.BoundaryStore`). Without a ``head`` this is all there is: layer ``i`` is done
   after its forward, and only two boundary buffers (its input and output) exist at once.
3. **head** (with a ``head``): after the last layer, per batch, ``head(h_L, batch, ids)`` gives ``∂L/∂h_L``
   [B, T, d] (the calibration's: the final norm and the windowed LM-head loss).
4. **backward sweep** from the top: layer ``i`` is recomputed from its stored input with gradients, the stored
   output gradient is backpropagated, and the input gradient replaces it in the one gradient buffer, for layer
   ``i−1``. Layer ``i``'s input buffer is then freed.

Each sweep takes decoder layer ``i`` up with :meth:`~obdk.stream.placement.LayerPlacement.fetch` and puts it
down with ``release`` (one decoder layer's weights on the compute device; with ``source`` read from the
checkpoint's shards). The hooks see, for every layer the sweep runs (see :class:`SweepHooks`): ``fetch``,
``layer_start``, ``batch_start``/``batch_end`` around each batch's layer call, ``forward_done`` (the dense input
and output of the layer on every window of this rank: :meth:`LayerSweep.inputs`, :meth:`LayerSweep.outputs`)
and ``layer_done`` (its last phase is over; the layer is still on the compute device).

Memory: the boundary activations ``(layers + 1) · N · T · d`` values in the model dtype on host (or scratch)
memory; one layer's weights and one batch's activations on the compute device. Compute: one extra forward of
every layer (the recompute) with a ``head``, none without.
"""
from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ..errors import NonFiniteError, StreamingUnsupportedError
from ..models import accepts_position_ids, decoder_layers, forward_kwargs
from .boundary import BoundaryStore, Buffer
from .capture import call_layer, capture
from .placement import LayerPlacement

log = logging.getLogger(__name__)

__all__ = ["LayerSweep", "SweepHooks", "Batch"]


@dataclass(frozen=True)
class Batch:
    """One batch of a sweep: the ``k``-th, rows ``start:stop`` of this rank's boundary buffers, the calibration
    ``windows`` it holds (indices into all windows), their ``mask`` [B, T] on the compute device (None: no
    padding) and ``tokens`` = B·T."""
    k: int
    start: int
    stop: int
    windows: list[int]
    mask: Optional[Tensor]
    tokens: int


class SweepHooks:
    """A per-layer consumer of a :class:`LayerSweep`; every method is optional (these do nothing).

    For each decoder layer ``i`` a phase (``"forward"``, then, with a head, ``"backward"`` from the top) runs, the
    sweep calls ``fetch(i, layer)`` once the layer's weights are on the compute device (it may overwrite them: set
    ``writes_weights`` and every fetch is a private copy, so the model never sees it), ``layer_start(i, phase)``,
    then per batch ``batch_start(i, phase, batch)`` and, after the layer's call on that batch (before its
    backward), ``batch_end(i, phase, batch)``. After the forward phase of layer ``i``, ``forward_done(i)``: its
    input and output on every window (:meth:`LayerSweep.inputs`, :meth:`LayerSweep.outputs`; the output of the
    top layer only for a consumer with ``wants_outputs``). When layer ``i``'s last phase is over,
    ``layer_done(i)``, still on the compute device. A consumer that needs the sweep (e.g. to run the layer on
    hidden states of its own, :meth:`LayerSweep.call`, with buffers from :attr:`LayerSweep.store`) keeps it.
    """

    writes_weights = False
    wants_outputs = False

    def fetch(self, i: int, layer: nn.Module) -> None:
        """Decoder layer ``i`` is on the compute device, before it runs."""

    def layer_start(self, i: int, phase: str) -> None:
        """Layer ``i``'s ``phase`` begins."""

    def batch_start(self, i: int, phase: str, batch: Batch) -> None:
        """Layer ``i`` is about to run on ``batch``."""

    def batch_end(self, i: int, phase: str, batch: Batch) -> None:
        """Layer ``i`` ran on ``batch`` (in ``"backward"``, its backward comes next)."""

    def forward_done(self, i: int) -> None:
        """Layer ``i``'s forward ran on every window: its input and output boundaries are complete."""

    def layer_done(self, i: int) -> None:
        """Layer ``i`` is done (its last phase is over); it is still on the compute device."""


class LayerSweep:
    """The windows ``ids`` [N, T] (``mask`` [N, T] or None) of this rank (``windows``: indices) through ``model``
    one decoder layer at a time (see the module docstring).

    ``runner``: the trunk that runs the decoder layers (``model.base_model``, :func:`obdk.models.trunk`);
    ``head``: None (a forward sweep only), or the backward sweep's seed: a callable ``head(h_last [B, T, d], batch,
    ids [B, T]) -> ∂L/∂h_last`` with ``norm`` (the trunk's final norm, checked by the capture) and ``modules`` (put
    on the compute device while it runs). ``top``: the last layer the forward sweep must run without a head
    (default the last); ``bottom``: the lowest layer the backward sweep must reach. ``batch_size``: windows per
    layer call. ``device``, ``source``, ``private``: the :class:`~obdk.stream.placement.LayerPlacement` (compute
    device; the checkpoint of a skeleton; every fetch a private copy). ``scratch_dir``, ``max_host_memory``,
    ``budget``: the :class:`~obdk.stream.boundary.BoundaryStore` of the boundary buffers. ``fn`` names the pass
    in messages and progress bars. :meth:`run` runs it with a list of :class:`SweepHooks`.
    """

    def __init__(self, model: nn.Module, ids: Tensor, mask: Optional[Tensor], *, runner: nn.Module,
                 windows: Sequence[int], batch_size: int = 1, head: Any = None, top: Optional[int] = None,
                 bottom: int = 0, device=None, source=None, private: bool = False, scratch_dir=None,
                 max_host_memory: Optional[int] = None, budget=None, progress: bool = True,
                 fn: str = "calibrate_streamed") -> None:
        self.model, self.ids, self.mask, self.runner, self.head, self.fn = model, ids, mask, runner, head, fn
        self.path, self.layers = decoder_layers(model)
        self.top = len(self.layers) - 1 if head is not None or top is None else int(top)
        self.bottom = int(bottom)
        self.progress = progress
        self._store_args = (max_host_memory, scratch_dir, budget)
        self.place = LayerPlacement(model, device=device, source=source, on_fetch=self._fetched, private=private,
                                    fn=fn)
        dev = self.place.device
        bs = int(batch_size)
        self.batches = [Batch(k, s, s + len(w), w, mask[w].to(dev) if mask is not None else None,
                              len(w) * ids.shape[1])
                        for k, (s, w) in enumerate((s, list(windows[s:s + bs])) for s in range(0, len(windows), bs))]
        self.windows = list(windows)
        self.hooks: list[SweepHooks] = []
        self.store: Optional[BoundaryStore] = None
        self.calls: list[list[tuple[tuple, dict]]] = []
        self.bufs: dict[int, Buffer] = {}
        self.gbuf: Optional[Buffer] = None
        self.seconds = {"capture": 0.0, "forward sweep": 0.0, "backward sweep": 0.0}

    # ----------------------------------------------------------------- for the hooks

    @property
    def device(self) -> torch.device:
        """The compute device."""
        return self.place.device

    def inputs(self, i: int) -> Tensor:
        """Decoder layer ``i``'s input on this rank's windows [N, T, d] (host or scratch memory)."""
        return self.bufs[i].tensor

    def outputs(self, i: int) -> Optional[Tensor]:
        """Decoder layer ``i``'s output [N, T, d] after its forward (None where the sweep keeps none)."""
        buf = self.bufs.get(i + 1)
        return None if buf is None else buf.tensor

    def call(self, i: int, batch: Batch, hidden: Tensor, layer: Optional[nn.Module] = None) -> Tensor:
        """Decoder layer ``i`` on ``hidden`` [B, T, d] with ``batch``'s captured arguments (on the compute device)."""
        layer = self.layers[i] if layer is None else layer
        return call_layer(layer, self.place.to_device(self.calls[i][batch.k]), hidden)

    def _each(self, what: str, *args) -> None:
        for h in self.hooks:
            getattr(h, what)(*args)

    def _fetched(self, i: int, layer: nn.Module) -> None:
        self._each("fetch", i, layer)

    # ----------------------------------------------------------------- the run

    def run(self, hooks: Sequence[SweepHooks] = ()) -> None:
        """Capture, forward sweep and (with a head) backward sweep, calling ``hooks``; every parameter is back where
        it was and every buffer freed (the scratch directory removed) when it returns or raises."""
        self.hooks = list(hooks)
        max_host_memory, scratch_dir, budget = self._store_args
        self.store = BoundaryStore(max_host_memory, scratch_dir, budget=budget, owner=self.fn)
        try:
            self._capture()
            self._forward()
            if self.head is not None:
                self._backward()
        finally:
            self.place.close()
            for b in list(self.bufs.values()) + [self.gbuf]:
                self.store.free(b)
            self.bufs, self.gbuf = {}, None
            self.store.close()

    def _capture(self) -> None:
        t0 = time.perf_counter()
        self.calls = [[] for _ in self.layers]
        norm = getattr(self.head, "norm", None)
        accepts_pos = accepts_position_ids(self.runner)
        with self.place.outside():  # embeddings, rotary embedding, final norm on the compute device
            for b in self.batches:
                kw = forward_kwargs(self.ids[b.windows].to(self.device), b.mask, accepts_pos)
                h0, cl, problem = capture(self.runner, self.layers, norm, kw, wrap_tuple=False)
                if problem is not None:
                    h0, cl, problem2 = capture(self.runner, self.layers, norm, kw, wrap_tuple=True)
                    if problem2 is not None:
                        raise StreamingUnsupportedError(
                            f"{self.fn}: {type(self.runner).__name__} does not run its decoder layers as a plain "
                            f"chain ({problem}); use the resident pass (stream=False)")
                if b.k == 0:
                    self.bufs[0] = self.store.alloc((len(self.windows), self.ids.shape[1], h0.shape[-1]), h0.dtype)
                self.bufs[0].tensor[b.start:b.stop].copy_(h0)
                cl = self.place.stage(cl)  # masks, rotary phases: host memory when the layers are staged
                for i in range(len(self.layers)):
                    self.calls[i].append(cl[i])
        self.seconds["capture"] = time.perf_counter() - t0

    def _bar(self, total: int, desc: str):
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=desc, unit="batch", disable=not self.progress, leave=False)

    def _forward(self) -> None:
        t0 = time.perf_counter()
        n, backward = self.top + 1, self.head is not None
        wants = any(h.wants_outputs for h in self.hooks)
        with self._bar(n * len(self.batches), f"obdk stream [forward sweep] layer 1/{n}") as bar:
            for i in range(n):
                bar.set_description(f"obdk stream [forward sweep] layer {i + 1}/{n}")
                layer = self.place.fetch(i)
                self._each("layer_start", i, "forward")
                last = backward and i == self.top
                need_out = not last and (i < self.top or wants)
                shape, dtype = self.bufs[i].tensor.shape, self.bufs[i].tensor.dtype
                out_buf = self.store.alloc(shape, dtype) if need_out else None
                if last:
                    self.gbuf = self.store.alloc(shape, dtype)
                with self.place.outside(*self.head.modules) if last else nullcontext():  # the head's modules
                    for b in self.batches:
                        self._forward_batch(i, b, layer, out_buf, last)
                        bar.update(1)
                if need_out:
                    self.bufs[i + 1] = out_buf
                self._each("forward_done", i)
                if not backward:
                    self._each("layer_done", i)  # while layer i is still on the compute device
                self.place.release(i)
                if need_out and not bool(torch.isfinite(out_buf.tensor).all()):
                    raise NonFiniteError(f"{self.fn}: non-finite hidden states after decoder layer {i} "
                                         f"({self.path}.{i})")
                if not backward:  # nothing comes back down: the input of layer i is done
                    self.store.free(self.bufs.pop(i))
        self.seconds["forward sweep"] = time.perf_counter() - t0

    def _forward_batch(self, i: int, b: Batch, layer: nn.Module, out_buf: Optional[Buffer], last: bool) -> None:
        h = self.bufs[i].tensor[b.start:b.stop].to(self.device)
        self._each("batch_start", i, "forward", b)
        with torch.no_grad():
            out = self.call(i, b, h, layer)
        self._each("batch_end", i, "forward", b)
        if last:
            self.gbuf.tensor[b.start:b.stop].copy_(self.head(out, b, self.ids[b.windows].to(self.device)))
        elif out_buf is not None:
            out_buf.tensor[b.start:b.stop].copy_(out)

    def _backward(self) -> None:
        t0 = time.perf_counter()
        n = self.top - self.bottom + 1
        with self._bar(n * len(self.batches), f"obdk stream [backward sweep] layer {self.top + 1}/{self.top + 1}") as bar:
            for i in range(self.top, self.bottom - 1, -1):
                bar.set_description(f"obdk stream [backward sweep] layer {i + 1}/{self.top + 1}")
                layer = self.place.fetch(i)
                self._each("layer_start", i, "backward")
                for b in self.batches:
                    self._backward_batch(i, b, layer)
                    bar.update(1)
                self._each("layer_done", i)  # while layer i is still on the compute device
                self.place.release(i)
                self.store.free(self.bufs.pop(i))
        self.seconds["backward sweep"] = time.perf_counter() - t0

    def _backward_batch(self, i: int, b: Batch, layer: nn.Module) -> None:
        h = self.bufs[i].tensor[b.start:b.stop].to(self.device)
        gout = self.gbuf.tensor[b.start:b.stop].to(self.device)
        need_in = i > self.bottom
        if need_in:
            h = h.detach().requires_grad_(True)
        self._each("batch_start", i, "backward", b)
        with torch.enable_grad():
            out = self.call(i, b, h, layer)
            self._each("batch_end", i, "backward", b)
            if out.requires_grad:
                torch.autograd.backward(out, gout)
        del out
        if need_in:
            self.gbuf.tensor[b.start:b.stop].copy_(h.grad if h.grad is not None else torch.zeros_like(h))

    def info(self) -> dict:
        """What the run measured: boundary bytes (``peak_host_bytes``, ``spilled_bytes``, ``peak_spilled_bytes``,
        ``scratch_files``), ``layers``, ``batches``, the placement's ``peak_layers_materialized``,
        ``weights_read_bytes``, ``weights_moved_bytes`` and ``device``."""
        st, pl = self.store, self.place
        return {"peak_host_bytes": st.peak_host_bytes, "spilled_bytes": st.spilled_bytes,
                "peak_spilled_bytes": st.peak_spilled_bytes, "scratch_files": st.files, "layers": len(self.layers),
                "batches": len(self.batches), "peak_layers_materialized": pl.peak_fetched,
                "weights_read_bytes": pl.read_bytes, "weights_moved_bytes": pl.moved_bytes,
                "device": str(pl.device)}
