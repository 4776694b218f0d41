"""Where the targeted Linears are, per architecture, and which share an input.

A declarative map per ``config.model_type`` (GPTQModel-style): the path of the
decoder-layer list and the groups of Linears inside one decoder layer that read
the same input tensor (q/k/v; gate/up). Unknown architectures fall back to
"every ``nn.Linear`` inside the decoder layers", each in its own group, where the
decoder layers are the longest ``nn.ModuleList`` of the model.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch.nn as nn

log = logging.getLogger(__name__)

_LLAMA_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)

#: model_type -> (decoder layers path, shared-input groups inside one layer)
ARCHITECTURES: dict[str, tuple[str, tuple[tuple[str, ...], ...]]] = {
    "llama": ("model.layers", _LLAMA_GROUPS),
    "mistral": ("model.layers", _LLAMA_GROUPS),
    "qwen2": ("model.layers", _LLAMA_GROUPS),
    "qwen3": ("model.layers", _LLAMA_GROUPS),
    "gemma": ("model.layers", _LLAMA_GROUPS),
    "gemma2": ("model.layers", _LLAMA_GROUPS),
    "phi3": ("model.layers", (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",))),
}


@dataclass(frozen=True)
class LinearGroup:
    """Linears of one decoder layer that read the same input.

    ``names`` are full module names (``model.layers.3.self_attn.q_proj``);
    ``key`` names the shared input (``model.layers.3.self_attn.q_proj:in``).
    """
    layer: int
    names: tuple[str, ...]

    @property
    def key(self) -> str:
        return self.names[0] + ":in"


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` (e.g. ``model.layers.3.mlp.up_proj``) by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _get(model: nn.Module, path: str) -> nn.Module | None:
    mod = model
    for part in path.split("."):
        if not hasattr(mod, part):
            return None
        mod = getattr(mod, part)
    return mod


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(path, layers)`` of the decoder-layer list of a causal LM.

    Uses the architecture map when ``model.config.model_type`` is known, else the
    longest ``nn.ModuleList`` that contains Linears. Raises ``ValueError`` if none.
    """
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    if mtype in ARCHITECTURES:
        path = ARCHITECTURES[mtype][0]
        mod = _get(model, path)
        if isinstance(mod, nn.ModuleList):
            return path, mod
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and any(isinstance(m, nn.Linear) for m in mod.modules()):
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__}: no nn.ModuleList containing nn.Linear")
    return best


def linear_groups(model: nn.Module, types: tuple[type, ...] = (nn.Linear,)) -> list[LinearGroup]:
    """All targeted Linears of ``model``, grouped by shared input, in forward order.

    Known architectures use :data:`ARCHITECTURES`; modules of a layer that the map
    does not name (or an unknown architecture) become singleton groups. ``types``:
    the module classes that count as members (add ``LowRankLinear`` for a compressed model).
    """
    path, layers = decoder_layers(model)
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    known = ARCHITECTURES.get(mtype, (None, ()))[1]
    if mtype not in ARCHITECTURES:
        log.info("architecture %r is not in obdk's map: targeting every nn.Linear in %s, no shared inputs", mtype, path)
    groups: list[LinearGroup] = []
    for i, layer in enumerate(layers):
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, types)}
        seen: set[str] = set()
        for grp in known:
            present = tuple(n for n in grp if n in linears)
            if present:
                groups.append(LinearGroup(i, tuple(f"{path}.{i}.{n}" for n in present)))
                seen.update(present)
        for n in linears:
            if n not in seen:
                groups.append(LinearGroup(i, (f"{path}.{i}.{n}",)))
    return groups
