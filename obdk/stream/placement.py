"""Where a streamed pass keeps each decoder layer's weights: on the compute device one layer at a time.

A layer-streamed pass (:class:`~obdk.stream.sweep.LayerSweep`) works on one decoder layer at a time, so only
that layer's weights need to be on the compute device, or in memory at all. :class:`LayerPlacement`:
``fetch(i)`` puts decoder layer ``i``'s weights on the compute device and ``release(i)`` puts them back;
:meth:`LayerPlacement.outside` does the same for the modules outside the decoder layers (embeddings, rotary
embedding, final norm, LM head) while they are used. A model on host memory with ``device="cuda"``: each tensor
of the layer is copied to the device at fetch (``.data`` replaced, the ``Parameter`` object kept) and its host
tensor is put back at release (no copy back: the weights are frozen). A skeleton
(:func:`~obdk.stream.shards.load_skeleton`) with a :class:`~obdk.stream.shards.ShardedWeights` source: the
layer's parameters are read from the shards onto the compute device at fetch, in each parameter's dtype, and
the meta parameters are put back at release, so at most one decoder layer is ever materialized.

Errors name the argument (:class:`~obdk.errors.ConfigError`).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn as nn
from torch import Tensor

from ..errors import ConfigError
from ..models import decoder_layers, input_device
from .shards import ShardedWeights, _in_layers

__all__ = ["LayerPlacement"]


# =========================================================================== placement


def _to(obj: Any, device: torch.device, memo: dict[int, Tensor]) -> Any:
    """``obj`` (tensors in nested tuples/lists/dicts) with every tensor on ``device``; ``memo`` keeps shared ones shared."""
    if torch.is_tensor(obj):
        if obj.device == device:
            return obj
        if id(obj) not in memo:
            memo[id(obj)] = obj.to(device)
        return memo[id(obj)]
    if isinstance(obj, tuple):
        return tuple(_to(o, device, memo) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device, memo) for k, v in obj.items()}
    return obj


class LayerPlacement:
    """Decoder layer ``i`` on the compute device between ``fetch(i)`` and ``release(i)``.

    ``fn`` names the pass in error messages. ``model``: a causal LM (resident anywhere, or a :func:`load_skeleton` skeleton with ``source``).
    ``device``: the compute device (None: where the model's input embeddings are). ``source``: the
    :class:`ShardedWeights` the skeleton's meta decoder layers are read from. ``on_fetch(i, layer)``: called
    after each fetch, before the layer runs; it may overwrite the fetched weights (e.g. install ``b @ a``),
    and the overwrite lasts until the release when the layer was moved or read (it went to the fetched
    copy), but stays in the model when nothing was moved (the layer already on ``device``, no source) unless
    ``private``: then every fetch is a copy (one layer's extra memory) and the model never sees an overwrite.

    Counters: ``peak_fetched`` (most decoder layers fetched at once), ``read_bytes`` (stored bytes read from
    ``source`` by fetches), ``moved_bytes`` (bytes copied to ``device`` by fetches and :meth:`outside`).
    :meth:`close` releases everything, also after an error; every parameter and buffer is then the very
    tensor it was before (host tensors untouched, meta parameters back).
    """

    def __init__(self, model: nn.Module, *, device: Optional[str | torch.device] = None,
                 source: Optional[ShardedWeights] = None,
                 on_fetch: Optional[Callable[[int, nn.Module], Any]] = None, fn: str = "calibrate_streamed",
                 private: bool = False) -> None:
        self.model, self.source, self.on_fetch = model, source, on_fetch
        #: every fetch gives a copy of the layer's tensors, also on the model's own device, so that on_fetch's
        #: overwrites never reach the model (one layer's extra memory)
        self.private = bool(private)
        self.path, self.layers = decoder_layers(model)
        if source is not None and not isinstance(source, ShardedWeights):
            raise ConfigError(f"{fn}: source= must be a ShardedWeights (load_skeleton), got "
                              f"{type(source).__name__}")
        for name, p in model.named_parameters():
            inside = _in_layers(name, self.path)
            if p.is_meta and (source is None or not inside):
                raise ConfigError(f"{fn}: parameter {name} is on the meta device; "
                                  + ("only decoder-layer parameters may be (load_skeleton)" if source is not None
                                     else "a skeleton needs source=ShardedWeights(<checkpoint directory>)"))
            if source is not None and inside and not p.is_meta:
                raise ConfigError(f"{fn}: source= is given but decoder-layer parameter {name} holds "
                                  f"real weights; pass the skeleton of load_skeleton (or drop source=)")
        home = input_device(model)
        try:
            self.device = home if device is None else torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(f"{fn}: device={device!r} is not a torch device ({exc})") from exc
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"{fn}: device={device!r}, but CUDA is not available here")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        #: the layers are copied or read onto a device other than the model's home (host memory)
        self.staged = self.device != home
        if self.staged and len(set(map(str, (getattr(model, "hf_device_map", None) or {}).values()))) > 1:
            raise ConfigError(f"{fn}: device= is given but the model is dispatched over several "
                              f"devices by accelerate ({sorted(set(map(str, model.hf_device_map.values())))}); load "
                              "it on one device (or host memory) instead")
        self._fetched: dict[int, list] = {}
        self.peak_fetched = 0
        self.read_bytes = 0
        self.moved_bytes = 0

    # ----------------------------------------------------------------- decoder layers

    def fetch(self, i: int) -> nn.Module:
        """Decoder layer ``i`` with its weights on the compute device (read from ``source`` for a skeleton);
        ``on_fetch(i, layer)`` has run. Returns the layer module."""
        if i in self._fetched:
            raise ConfigError(f"LayerPlacement: decoder layer {i} is already fetched")
        layer = self.layers[i]
        saved: list = []
        self._fetched[i] = saved
        self.peak_fetched = max(self.peak_fetched, len(self._fetched))
        if self.source is not None:
            before = self.source.read_bytes
            state = self.source.module_state(f"{self.path}.{i}.", self.device, like=layer)
            self.read_bytes += self.source.read_bytes - before
            new: dict[int, nn.Parameter] = {}
            for mname, mod in layer.named_modules():
                for pname, p in list(mod._parameters.items()):
                    if p is None:
                        continue
                    if id(p) not in new:
                        new[id(p)] = nn.Parameter(state[f"{mname}.{pname}" if mname else pname],
                                                  requires_grad=p.requires_grad)
                    saved.append((mod._parameters, pname, p))
                    mod._parameters[pname] = new[id(p)]
            self._move(list(layer.buffers()), saved)  # a layer's own buffers (if any) are real in a skeleton
        else:
            self._move([*layer.parameters(), *layer.buffers()], saved, copy=self.private)
        if self.on_fetch is not None:
            self.on_fetch(i, layer)
        return layer

    def release(self, i: int) -> None:
        """Decoder layer ``i``'s weights back where they were (host tensors, or meta for a skeleton)."""
        saved = self._fetched.pop(i, [])
        self._restore([e for e in saved if len(e) == 2])
        for table, key, old in reversed([e for e in saved if len(e) == 3]):
            table[key] = old

    def _move(self, tensors: list[Tensor], saved: list, copy: bool = False) -> None:
        """Put ``tensors`` (parameters, buffers) on the compute device, each keeping its object: ``.data`` is
        replaced and ``(tensor, old data)`` recorded in ``saved`` for :meth:`_restore`."""
        seen: set[int] = set()
        for t in tensors:
            if id(t) in seen or (t.device == self.device and not copy):
                continue
            seen.add(id(t))
            saved.append((t, t.data))
            t.data = t.data.to(self.device, copy=True) if copy else t.data.to(self.device)
            self.moved_bytes += t.numel() * t.element_size()

    @staticmethod
    def _restore(saved: list) -> None:
        for t, old in reversed(saved):
            t.data = old

    # ----------------------------------------------------------------- outside the decoder layers

    @contextmanager
    def outside(self, *modules: nn.Module) -> Iterator[None]:
        """While inside: ``modules`` (default: everything outside the decoder layers, for the embedding
        capture; or e.g. the final norm and LM head for the head gradient) on the compute device, and back
        (the host tensors themselves) on leaving, also on an error."""
        if modules:
            tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
        else:
            tensors = [t for n, t in (*self.model.named_parameters(), *self.model.named_buffers())
                       if not _in_layers(n, self.path)]
        saved: list = []
        try:
            self._move(tensors, saved)
            yield
        finally:
            self._restore(saved)

    # ----------------------------------------------------------------- whole pass

    def stage(self, obj: Any) -> Any:
        """``obj`` (a batch's captured layer arguments: masks, rotary phases) with its tensors in host memory
        when the layers are staged onto another device (shared tensors stay shared), else ``obj`` itself."""
        return _to(obj, torch.device("cpu"), {}) if self.staged else obj

    def to_device(self, obj: Any) -> Any:
        """``obj`` (a layer call's captured arguments) with its tensors on the compute device (shared ones once)."""
        return _to(obj, self.device, {})

    @contextmanager
    def real_parameters(self, progress: bool = False) -> Iterator[None]:
        """While inside, ``model.named_parameters()`` yields real tensors: a skeleton's meta parameters are read
        from ``source`` (CPU, their dtype), one at a time, for e.g. the model fingerprint (a tqdm bar
        ``obdk stream [fingerprint]`` with ``progress``); ``model.parameters()`` keeps yielding the meta ones
        (dtype and shape only). Without a source nothing changes."""
        if self.source is None:
            yield
            return
        from tqdm.auto import tqdm
        model, source = self.model, self.source
        plain = model.named_parameters
        total = sum(p.is_meta for _, p in plain())

        def named_parameters(*args, **kwargs):
            with tqdm(total=total, desc="obdk stream [fingerprint] reading the decoder layers", unit="tensor",
                      disable=not progress, leave=False) as bar:
                for name, p in plain(*args, **kwargs):
                    if p.is_meta:
                        p = source.tensor(name, "cpu", p.dtype, shape=p.shape)
                        bar.update(1)
                    yield name, p

        model.named_parameters = named_parameters
        model.parameters = lambda recurse=True: (p for _, p in plain(recurse=recurse))
        try:
            yield
        finally:
            model.__dict__.pop("named_parameters", None)
            model.__dict__.pop("parameters", None)

    def close(self) -> None:
        """Release every fetched layer (e.g. after an error; :meth:`outside` restores its own moves)."""
        for i in list(self._fetched):
            self.release(i)
