"""A safetensors checkpoint read one tensor (or one decoder layer) at a time, and the skeleton that needs it.

* :class:`ShardedWeights` — the tensors of a Hugging Face safetensors checkpoint directory
  (``model.safetensors``, or shards listed in ``model.safetensors.index.json``), indexed from the file
  headers (:func:`obdk.io.format.tensor_index`, the one shard-index reader) and read a module (or a tensor)
  at a time, each checked for shape and finiteness.
* :func:`load_skeleton` — the causal LM of a checkpoint directory with every decoder-layer parameter on
  the meta device and everything else real, and the :class:`ShardedWeights` to stream the layers from
  (:class:`~obdk.stream.placement.LayerPlacement` reads each layer when a pass needs it).

Errors name the directory, file and tensor (:class:`~obdk.errors.CheckpointError`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ..errors import CheckpointError
from ..models import decoder_layers

__all__ = ["ShardedWeights", "load_skeleton"]


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

        from ..finite import all_finite
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
    :func:`~obdk.pipeline.prepare` (``stream=True, source=``) or :func:`~obdk.calibrate.stream.calibrate_streamed`
    (``source=``). Raises :class:`CheckpointError` naming
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
