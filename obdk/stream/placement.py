"""Where a streamed pass keeps each decoder layer's weights: on the compute device one layer at a time.

A layer-streamed pass (:func:`~obdk.calibrate.stream.calibrate_streamed`) works on one decoder layer at
a time, so only that layer's weights need to be on the compute device, or in memory at all:

* :class:`LayerPlacement` — ``fetch(i)`` puts decoder layer ``i``'s weights on the compute device and
  ``release(i)`` puts them back; :meth:`LayerPlacement.outside` does the same for the modules outside the
  decoder layers (embeddings, rotary embedding, final norm, LM head) while they are used. A model on host
  memory with ``device="cuda"``: each tensor of the layer is copied to the device at fetch (``.data``
  replaced, the ``Parameter`` object kept) and its host tensor is put back at release (no copy back: the
  weights are frozen). A skeleton (:func:`load_skeleton`) with a :class:`ShardedWeights` source: the layer's
  parameters are read from the shards onto the compute device at fetch, in each parameter's dtype, and the
  meta parameters are put back at release, so at most one decoder layer is ever materialized.
* :class:`ShardedWeights` — the tensors of a Hugging Face safetensors checkpoint directory
  (``model.safetensors``, or shards listed in ``model.safetensors.index.json``), indexed from the file
  headers and read a module (or a tensor) at a time, each checked for shape and finiteness.
* :func:`load_skeleton` — the causal LM of a checkpoint directory with every decoder-layer parameter on
  the meta device and everything else real, and the :class:`ShardedWeights` to stream the layers from.

Errors name the directory, file and tensor (:class:`~obdk.errors.CheckpointError`) or the argument
(:class:`~obdk.errors.ConfigError`).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ..errors import CheckpointError, ConfigError
from ..models import decoder_layers, input_device

__all__ = ["LayerPlacement", "ShardedWeights", "load_skeleton"]

# =========================================================================== checkpoint tensors


class ShardedWeights:
    """The tensors of a HF safetensors checkpoint ``directory``, read on demand.

    The index (name → file, stored dtype, shape) comes from the file headers only, through
    :func:`obdk.io.format.tensor_index` (the one shard-index reader). ``read_bytes`` counts the stored bytes
    of every tensor read so far (what was read from disk). Raises :class:`CheckpointError` naming the
    directory when it holds neither ``model.safetensors`` nor ``model.safetensors.index.json``, and naming
    the file for an unreadable or truncated shard or a tensor the index lists but its shard lacks.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        from ..io.format import INDEX_FILE, SINGLE_FILE, tensor_index
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: no such checkpoint directory")
        index = self.directory / INDEX_FILE
        if not index.is_file() and not (self.directory / SINGLE_FILE).is_file():
            raise CheckpointError(f"{self.directory}: no {SINGLE_FILE} or {INDEX_FILE} (not a safetensors "
                                  f"checkpoint directory)")
        self.where = index if index.is_file() else self.directory / SINGLE_FILE
        self._info = tensor_index(self.directory)
        self.read_bytes = 0

    def __contains__(self, name: str) -> bool:
        return name in self._info

    def names(self, prefix: str = "") -> list[str]:
        """Every tensor name starting with ``prefix``, in file order."""
        return [k for k in self._info if k.startswith(prefix)]

    def file(self, name: str) -> Path:
        """The file holding tensor ``name``."""
        return self._entry(name).file

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape of tensor ``name`` (from the header)."""
        return self._entry(name).shape

    def _entry(self, name: str):
        e = self._info.get(name)
        if e is None:
            raise CheckpointError(f"{self.where}: tensor {name!r} missing from the checkpoint")
        return e

    def stored_dtype(self, name: str):
        """The stored dtype of tensor ``name``: a ``torch.dtype`` (the header's string where torch has none)."""
        return self._entry(name).dtype

    def check_shape(self, name: str, shape: Sequence[int]) -> None:
        """Raise :class:`CheckpointError` (naming file and tensor) when ``name`` is missing or not ``shape``."""
        f, have = self._entry(name).file, self._entry(name).shape
        if have != tuple(shape):
            raise CheckpointError(f"{f}: tensor {name!r} has shape {have}, expected {tuple(shape)}")

    def read(self, specs: dict[str, tuple[Optional[Sequence[int]], Optional[torch.dtype]]],
             device: Optional[str | torch.device] = None) -> dict[str, Tensor]:
        """Read the tensors ``specs`` ``{name: (shape or None, dtype or None)}`` onto ``device`` (default CPU).

        Each shard file is opened once. A tensor must have the given shape (None: any); a floating tensor
        is cast to the given dtype (None: as stored). Every floating tensor is checked finite after the
        cast. Returns ``{name: tensor}``. Raises :class:`CheckpointError` naming the file and tensor.
        """
        from safetensors import safe_open
        from ..decompose.roots import all_finite
        dev = torch.device(device) if device is not None else torch.device("cpu")
        by_file: dict[Path, list[str]] = {}
        for name, (shape, _) in specs.items():
            if shape is not None:
                self.check_shape(name, shape)
            by_file.setdefault(self._entry(name).file, []).append(name)
        out: dict[str, Tensor] = {}
        for f, names in by_file.items():
            try:
                handle = safe_open(str(f), framework="pt", device="cpu")
            except Exception as exc:
                raise CheckpointError(f"{f}: unreadable safetensors file ({exc})") from exc
            with handle as h:
                for name in names:
                    try:
                        t = h.get_tensor(name)
                    except Exception as exc:
                        raise CheckpointError(f"{f}: tensor {name!r} unreadable ({exc})") from exc
                    self.read_bytes += t.numel() * t.element_size()
                    stored = t.dtype
                    dtype = specs[name][1]
                    if t.is_floating_point() and dtype is not None and dtype != stored:
                        # narrow on the host (fewer bytes to move), widen on the device
                        narrow = torch.empty((), dtype=dtype).element_size() < t.element_size()
                        t = t.to(dtype).to(dev) if narrow else t.to(dev).to(dtype)
                    else:
                        t = t.to(dev)
                    if t.is_floating_point() and not all_finite(t):
                        bad = int((~torch.isfinite(t)).sum())
                        cast = f" after the cast from {stored} to {t.dtype} (the values overflow it)" \
                            if t.dtype != stored else ""
                        raise CheckpointError(f"{f}: tensor {name!r} holds NaN/Inf in {bad} of {t.numel()} "
                                              f"entries{cast}; the checkpoint is corrupt or this dtype cannot hold it")
                    out[name] = t
        return out

    def tensor(self, name: str, device: Optional[str | torch.device] = None, dtype: Optional[torch.dtype] = None,
               *, shape: Optional[Sequence[int]] = None) -> Tensor:
        """One tensor ``name`` (e.g. a correction's original ``model.layers.3.mlp.up_proj.weight`` [m, n]) on
        ``device`` (default CPU), floating values cast to ``dtype`` (None: as stored), checked against
        ``shape`` when given and checked finite."""
        return self.read({name: (shape, dtype)}, device)[name]

    def module_state(self, prefix: str, device: Optional[str | torch.device] = None,
                     dtype: Optional[torch.dtype] = None, *, like: Optional[nn.Module] = None) -> dict[str, Tensor]:
        """The tensors of the module at ``prefix`` (e.g. ``"model.layers.3."``), names relative to it.

        Without ``like``: every checkpoint tensor whose name starts with ``prefix``, floating ones cast to
        ``dtype`` (None: as stored). With ``like`` (the module, e.g. a skeleton's decoder layer): exactly
        its parameters, each of its shape and cast to its dtype (``dtype``, when given, overrides), a
        missing one an error. Shapes are the tensors' own ([m, n] for a Linear weight). Ready for
        ``module.load_state_dict(state, strict=False, assign=True)``.
        """
        if like is None:
            specs = {k: (None, dtype) for k in self.names(prefix)}
        else:
            specs = {prefix + n: (tuple(p.shape), dtype or p.dtype) for n, p in like.named_parameters()}
        return {k[len(prefix):]: t for k, t in self.read(specs, device).items()}


# =========================================================================== the skeleton


def _checkpoint_dtype(config: Any, source: ShardedWeights) -> torch.dtype:
    """The dtype a HF ``from_pretrained(dtype="auto")`` would load: the config's, else the first floating tensor's."""
    for key in ("dtype", "torch_dtype"):
        v = getattr(config, key, None)
        if isinstance(v, torch.dtype):
            return v
        if isinstance(v, str) and isinstance(getattr(torch, v.removeprefix("torch."), None), torch.dtype):
            return getattr(torch, v.removeprefix("torch."))
    for k in source.names():
        dt = source.stored_dtype(k)
        if dt in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
            return dt
    return torch.float32


def _in_layers(name: str, path: str) -> bool:
    return name.startswith(path + ".")


def load_skeleton(directory: str | os.PathLike, dtype: Optional[torch.dtype] = None) -> tuple[nn.Module, ShardedWeights]:
    """The causal LM of HF checkpoint ``directory`` with its decoder layers left on the meta device.

    Builds the model from ``config.json`` (``AutoModelForCausalLM.from_config`` under
    ``torch.device("meta")``, in ``dtype``; None: the checkpoint's, as ``from_pretrained`` chooses), then
    materializes on CPU everything outside the decoder layers: parameters (embeddings, final norm,
    ``lm_head``; a tied weight is read once and stays tied) and buffers from the shards, and buffers the
    checkpoint does not hold (rotary ``inv_freq``: built on meta it has no values) recomputed by the
    model's own ``_init_weights`` (checked: a buffer it leaves unset is an error). Every decoder-layer
    parameter is checked against the shard headers (present, same shape) but not read. The model is in
    eval mode with ``config._name_or_path = directory`` (as ``from_pretrained`` sets it, so the model
    fingerprint is the same). Returns ``(model, ShardedWeights)``: pass both to
    :func:`~obdk.calibrate.stream.calibrate_streamed` (``source=``). Raises :class:`CheckpointError` naming
    the directory (no ``config.json``, no safetensors), or the file and tensor.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory}: no config.json (not a Hugging Face model directory)")
    source = ShardedWeights(directory)
    try:
        config = AutoConfig.from_pretrained(str(directory))
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise CheckpointError(f"{directory / 'config.json'}: not a model config transformers can build ({exc})") from exc
    dtype = dtype or _checkpoint_dtype(config, source)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config._name_or_path = os.fspath(directory)
    model.eval()
    path, layers = decoder_layers(model)
    modules = dict(model.named_modules())

    # buffers: from the checkpoint when it holds them, else recomputed by the model's own initialisation
    recompute: dict[str, nn.Module] = {}
    for name, buf in model.named_buffers():
        if not buf.is_meta:
            continue
        owner, _, bname = name.rpartition(".")
        mod = modules[owner]
        if name in source:
            mod._buffers[bname] = source.tensor(name, "cpu", buf.dtype if buf.is_floating_point() else None,
                                                shape=buf.shape)
        else:
            mod._buffers[bname] = torch.full(buf.shape, float("nan"), dtype=buf.dtype) if buf.is_floating_point() \
                else torch.zeros(buf.shape, dtype=buf.dtype)
            recompute[name] = mod
    for mod in {id(m): m for m in recompute.values()}.values():
        model._init_weights(mod)  # e.g. RotaryEmbedding: inv_freq from the config (parameters still meta)
    for name, mod in recompute.items():
        b = mod._buffers[name.rpartition(".")[2]]
        if b.is_floating_point() and not bool(torch.isfinite(b).all()):
            raise CheckpointError(f"{directory}: buffer {name!r} is not in the checkpoint and "
                                  f"{type(model).__name__}._init_weights does not compute it")

    # parameters outside the decoder layers: read once per Parameter object (ties stay tied)
    aliases: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owner, _, pname = name.rpartition(".")
        aliases.setdefault(id(p), []).append((name, modules[owner], pname))
    for group in aliases.values():
        names = [n for n, _, _ in group]
        p = group[0][1]._parameters[group[0][2]]
        if all(_in_layers(n, path) for n in names):
            for n in names:
                source.check_shape(n, p.shape)
            continue
        stored = next((n for n in names if n in source), names[0])
        t = source.tensor(stored, "cpu", p.dtype, shape=p.shape)
        new = nn.Parameter(t, requires_grad=p.requires_grad)
        for _, mod, pname in group:
            mod._parameters[pname] = new
    return model, source


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
