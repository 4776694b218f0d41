"""Layer-wise healing: each decoder layer's factors trained so that the compressed layer, fed the compressed
model's input to it, reproduces the dense layer's output on the dense input.

It is a :class:`~obdk.stream.sweep.SweepHooks` consumer of a forward :class:`~obdk.stream.sweep.LayerSweep` of the
dense model, so it runs wherever the sweep runs: on a resident model, one decoder layer at a time from host memory
onto the compute device, or from a checkpoint's shards (``--weights-on-disk``), each rank on its windows under a
process group. When the sweep has decoder layer ``i`` on the compute device and its dense input ``X_i`` and output
``Y_i`` on every window, :class:`LayerHealer` swaps the layer's targets for :class:`~obdk.heal.train.HealFactors`
(the truncated, corrected factors as fp32 masters), trains them on ``MSE(layer̃(X̃_i), Y_i)`` (per token, summed
over the hidden dimension and divided by it) with the schedule of :mod:`obdk.heal.train`, computes the compressed
stream's next input ``X̃_{i+1} = layer̃(X̃_i)``, and puts the dense modules back before the layer is released.

Memory beyond the sweep's own (the dense input and output boundaries): the compressed stream's two boundaries
(``2 · N · T · d`` values in the model dtype, from the sweep's :class:`~obdk.stream.boundary.BoundaryStore`:
host memory, then scratch), one layer's factors in fp32 four times (masters, Adam's two moments, the best point)
and one window's activations with their graph. The healed factors go to a
:class:`~obdk.correct.factor_store.FactorStore` (a streamed plan in one process) or a dict.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
import torch.nn as nn
from torch import Tensor

from ..errors import NonFiniteError
from ..models import decoder_layers, set_module
from ..stream.sweep import LayerSweep, SweepHooks
from .train import HealFactors, Schedule, master_dtype, train

__all__ = ["LayerHealer", "heal_layerwise"]


class LayerHealer(SweepHooks):
    """The consumer (module docstring). ``factors``: ``{name: (a, b, predicted)}`` (a mapping read one layer at a
    time); ``out``: where each layer's healed factors go (``put_layer(i, {name: (a, b, predicted)})`` or a dict);
    ``train_windows``/``held_out``: global window indices; ``schedule``: :class:`~obdk.heal.train.Schedule`."""

    wants_outputs = True

    def __init__(self, model: nn.Module, factors: Mapping[str, tuple], out: Any, *, train_windows, held_out,
                 schedule: Schedule, bar=None) -> None:
        self.factors, self.out, self.schedule, self.bar = factors, out, schedule, bar
        self.train_windows, self.held_out = list(train_windows), list(held_out)
        path, _ = decoder_layers(model)
        self.by_layer: dict[int, list[str]] = {}
        for n in factors:
            i, rel = n[len(path) + 1:].split(".", 1)
            self.by_layer.setdefault(int(i), []).append(rel)
        self.path = path
        self.sweep: Optional[LayerSweep] = None
        self.layer: Optional[nn.Module] = None
        self.cur = None  # the compressed stream's input to the current layer (None: the dense input, layers below
        # the first healed one are the dense model's)
        self.info: dict[int, dict] = {}
        self._batch: dict[int, Any] = {}  # global window -> its one-window sweep batch (its row is batch.start)

    def attach(self, sweep: LayerSweep) -> None:
        """Heal inside ``sweep`` (batches of one window each)."""
        self.sweep = sweep
        self._batch = {b.windows[0]: b for b in sweep.batches}

    def fetch(self, i: int, layer: nn.Module) -> None:
        self.layer = layer

    def forward_done(self, i: int) -> None:
        sw = self.sweep
        rels = self.by_layer.get(i, [])
        if not rels and self.cur is None:
            return  # the compressed model's layer i is the dense one on the dense input
        x_in = sw.inputs(i) if self.cur is None else self.cur.tensor
        y = sw.outputs(i)
        last = i == sw.top
        if rels:
            self._heal(i, rels, x_in, y, last)
        elif not last:
            self._propagate(i, x_in)
        if last:  # nothing reads the compressed stream after the top layer
            self.close()

    def _heal(self, i: int, rels: list[str], x_in: Tensor, y: Tensor, last: bool) -> None:
        sw, layer = self.sweep, self.layer
        names = [f"{self.path}.{i}.{r}" for r in rels]
        got = {n: self.factors[n] for n in names}
        swapped: dict[str, nn.Module] = {}
        frozen = [p for p in layer.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            for r, n in zip(rels, names):
                orig = layer.get_submodule(r)
                a, b, _ = got[n]
                swapped[r] = orig
                set_module(layer, r, HealFactors(a.to(sw.device), b.to(sw.device), orig.bias,
                                                 master_dtype(orig.weight.dtype)))
            mods = [layer.get_submodule(r) for r in rels]
            params = [p for m in mods for p in (m.a, m.b)]

            def run(w: int, grad: bool) -> tuple[Tensor, int]:
                batch = self._batch[w]
                h = x_in[batch.start:batch.stop].to(sw.device)
                target = y[batch.start:batch.stop].to(sw.device)
                with torch.set_grad_enabled(grad):
                    out = sw.call(i, batch, h, layer)
                    t = target.float()
                    # each token's squared error relative to its dense output's: the residual stream's massive
                    # activations (a few tokens, a few dimensions) would otherwise be all that plain MSE sees
                    err = (out.float() - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-30)  # [1, T]
                    if batch.mask is not None:
                        keep = batch.mask.bool()
                        return err[keep].sum(), int(keep.sum())
                    return err.sum(), int(err.numel())

            self.info[i] = train(params, lambda w: run(w, True), mine=sw.windows, train_windows=self.train_windows,
                                 held_out=self.held_out, schedule=self.schedule,
                                 evaluate=lambda w: run(w, False), what=f"heal layer-wise ({self.path}.{i})",
                                 bar=self.bar)
            healed = {n: (*m.factors(got[n][0].dtype), got[n][2]) for n, m in zip(names, mods)}
            if not last:
                self._propagate(i, x_in)
        finally:
            for r, orig in swapped.items():
                set_module(layer, r, orig)
            for p in frozen:
                p.requires_grad_(True)
        healed = {n: (a.cpu(), b.cpu(), pred) for n, (a, b, pred) in healed.items()}
        if isinstance(self.out, dict):
            self.out.update(healed)
        else:
            self.out.put_layer(i, healed)

    @torch.no_grad()
    def _propagate(self, i: int, x_in: Tensor) -> None:
        """``X̃_{i+1}`` = the layer as it is now (healed modules in place) on ``X̃_i``, for every window here."""
        sw = self.sweep
        nxt = sw.store.alloc(tuple(x_in.shape), x_in.dtype)
        for b in sw.batches:
            out = sw.call(i, b, x_in[b.start:b.stop].to(sw.device), self.layer)
            nxt.tensor[b.start:b.stop].copy_(out)
        if not bool(torch.isfinite(nxt.tensor).all()):
            sw.store.free(nxt)
            raise NonFiniteError(f"heal layer-wise: non-finite hidden states after the healed decoder layer {i} "
                                 f"({self.path}.{i})")
        if self.cur is not None:
            sw.store.free(self.cur)
        self.cur = nxt

    def close(self) -> None:
        """Free the compressed stream's boundary (the sweep's store removes its scratch files in any case)."""
        if self.cur is not None and self.sweep is not None and self.sweep.store is not None:
            self.sweep.store.free(self.cur)
        self.cur = None


def heal_layerwise(model: nn.Module, factors: Mapping[str, tuple], ids: Tensor, mask: Optional[Tensor], out: Any, *,
                   windows, train_windows, held_out, schedule: Schedule, runner: nn.Module, device=None, source=None,
                   scratch_dir=None, max_host_memory=None, budget=None, progress: bool = True) -> dict[int, dict]:
    """Heal ``factors`` layer by layer on the windows ``ids`` [N, T] (``mask``) of this rank (``windows``: global
    indices) and put the results in ``out``; returns ``{layer: train()'s record}``. The sweep's options
    (``device``, ``source``, ``scratch_dir``, ``max_host_memory``, ``budget``) as for
    :class:`~obdk.stream.sweep.LayerSweep`; one window per layer call."""
    from tqdm.auto import tqdm
    path, layers = decoder_layers(model)
    n_heal = len({n[len(path) + 1:].split(".", 1)[0] for n in factors})
    with tqdm(total=n_heal * schedule.steps, desc="obdk heal [layer-wise]", unit="step", disable=not progress,
              leave=False) as bar:
        healer = LayerHealer(model, factors, out, train_windows=train_windows, held_out=held_out,
                             schedule=schedule, bar=bar)
        sweep = LayerSweep(model, ids, mask, runner=runner, windows=windows, batch_size=1, device=device,
                           source=source, scratch_dir=scratch_dir, max_host_memory=max_host_memory, budget=budget,
                           progress=progress, fn="heal layer-wise")
        healer.attach(sweep)
        try:
            sweep.run([healer])
        finally:
            healer.close()
    return healer.info
