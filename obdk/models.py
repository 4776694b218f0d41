"""Where the targeted Linears are, per architecture, and which share an input.

One record per ``config.model_type`` (:class:`Architecture`, GPTQModel-style): the path of the
decoder-layer list, the groups of Linears inside one decoder layer that read the same input
tensor (q/k/v; gate/up), whether its head is plain and whether the streamed passes run it.
Unknown architectures fall back to "every ``nn.Linear`` inside the decoder layers", each in its
own group, where the decoder layers are the longest ``nn.ModuleList`` of the model. How a model's
trunk is run (:func:`trunk`, :func:`forward_kwargs`, :func:`input_device`) is here too: the
calibration, the corrections and the streamed sweep all run it the same way.
"""
from __future__ import annotations

import fnmatch
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from .errors import ConfigError, UnsupportedModelError

log = logging.getLogger(__name__)

_LLAMA_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)

#: Linear-like layers of other libraries that obdk does not decompose (named in errors and coverage).
_UNSUPPORTED_LINEAR_TYPES = frozenset({"Conv1D"})

@dataclass(frozen=True)
class Architecture:
    """What obdk knows of one ``config.model_type``, in one record.

    * ``layers``: the path of the decoder-layer ``nn.ModuleList`` (``"model.layers"``);
    * ``groups``: the Linears of one decoder layer that read the same input (q/k/v; gate/up), relative names;
    * ``plain_head``: the ``*ForCausalLM`` computes ``logits = lm_head(base_model(...)[0])`` with nothing in
      between (no logit scaling; soft-capping only where the config sets it, checked at run time), so a
      backward pass forms the head's loss gradient one window at a time (:func:`obdk.calibrate.head.plain_head`);
    * ``streams``: the layer-streamed passes (:mod:`obdk.stream.sweep`) are verified on it (tests: llama, qwen2,
      mistral, phi3) or its trunk is the same loop (qwen3); the capture checks the structure at run time anyway.
    """
    layers: str
    groups: tuple[tuple[str, ...], ...]
    plain_head: bool = False
    streams: bool = False


#: ``config.model_type`` -> its :class:`Architecture` (the one map of per-architecture knowledge)
ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("model.layers", _LLAMA_GROUPS, plain_head=True, streams=True),
    "mistral": Architecture("model.layers", _LLAMA_GROUPS, plain_head=True, streams=True),
    "qwen2": Architecture("model.layers", _LLAMA_GROUPS, plain_head=True, streams=True),
    "qwen3": Architecture("model.layers", _LLAMA_GROUPS, plain_head=True, streams=True),
    "gemma": Architecture("model.layers", _LLAMA_GROUPS, plain_head=True),
    "gemma2": Architecture("model.layers", _LLAMA_GROUPS, plain_head=True),
    "phi3": Architecture("model.layers", (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",),
                                          ("mlp.down_proj",)), plain_head=True, streams=True),
}


def architecture(model: nn.Module) -> Optional[Architecture]:
    """The :class:`Architecture` of ``model.config.model_type``, or None for a type obdk has no record of."""
    return ARCHITECTURES.get(getattr(getattr(model, "config", None), "model_type", None))


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
    arch = architecture(model)
    if arch is not None:
        mod = _get(model, arch.layers)
        if isinstance(mod, nn.ModuleList):
            return arch.layers, mod
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and any(isinstance(m, nn.Linear) for m in mod.modules()):
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        other = sorted({type(m).__name__ for m in model.modules() if type(m).__name__ in _UNSUPPORTED_LINEAR_TYPES})
        why = (f": its layers are {', '.join(other)}, which obdk cannot target (only nn.Linear)" if other
               else ": no nn.ModuleList containing nn.Linear")
        raise UnsupportedModelError(f"cannot find the decoder layers of {type(model).__name__}{why}")
    return best


def linear_groups(model: nn.Module, types: tuple[type, ...] = (nn.Linear,)) -> list[LinearGroup]:
    """All targeted Linears of ``model``, grouped by shared input, in forward order.

    Known architectures use :data:`ARCHITECTURES`; modules of a layer that the map
    does not name (or an unknown architecture) become singleton groups. ``types``:
    the module classes that count as members (add ``LowRankLinear`` for a compressed model).
    """
    path, layers = decoder_layers(model)
    arch = architecture(model)
    known = arch.groups if arch is not None else ()
    if arch is None:
        log.info("architecture %r is not in obdk's map: targeting every nn.Linear in %s, no shared inputs",
                 getattr(getattr(model, "config", None), "model_type", None), path)
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


# --------------------------------------------------------------------------- targets


@dataclass
class Target:
    """A targeted Linear: full name, shape ``[m, n]`` (out × in), and the key of its (shared) input."""
    name: str
    m: int
    n: int
    input_key: str
    has_bias: bool


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def select_targets(model: nn.Module, config) -> list[Target]:
    """Targeted Linears of ``model`` in forward order, after ``config.targets``/``config.ignore`` patterns.

    Raises :class:`~obdk.errors.ConfigError` when no Linear matches (naming the patterns).
    """
    out = []
    for grp in linear_groups(model):
        for name in grp.names:
            if config.targets is not None and not _matches(name, config.targets):
                continue
            if _matches(name, config.ignore):
                continue
            lin = model.get_submodule(name)
            if not isinstance(lin, nn.Linear):
                continue
            out.append(Target(name, lin.out_features, lin.in_features, grp.key, lin.bias is not None))
    if not out:
        raise ConfigError(f"no Linear matched: targets={config.targets} ignore={config.ignore}")
    return out


#: an untargeted parameter at least this large (elements) is listed in the coverage report
LARGE_PARAM = 1 << 16


def coverage(model: nn.Module, targets: Sequence[Target]) -> dict:
    """Which parameters the targets cover, and which large ones they do not.

    Returns ``{"model_params", "targeted_params", "targeted_fraction", "untargeted": [...]}``
    where ``untargeted`` lists, largest first, the parameters outside the targets of ≥
    :data:`LARGE_PARAM` elements, and every fused-expert or ``Conv1D`` one whatever its size (``{"name", "shape", "params", "kind"}``; ``kind`` is
    ``embedding``, ``lm_head``, ``fused-experts`` for ≥ 3-D expert tensors of MoE models,
    ``Conv1D`` for GPT-2-style layers, ``linear`` for an ignored or unmatched Linear, else
    ``other``). Tied parameters count once.
    """
    targeted = {t.name + ".weight" for t in targets} | {t.name + ".bias" for t in targets if t.has_bias}
    owners = {}
    for mname, mod in model.named_modules():
        for pname, _ in mod.named_parameters(recurse=False):
            owners[f"{mname}.{pname}" if mname else pname] = mod
    seen: set[int] = set()
    total = covered = 0
    untargeted = []
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if name in targeted:
            covered += p.numel()
            continue
        mod = owners.get(name)
        if p.numel() < LARGE_PARAM and p.dim() < 3 and type(mod).__name__ not in _UNSUPPORTED_LINEAR_TYPES:
            continue
        kind = ("embedding" if isinstance(mod, nn.Embedding) else
                "lm_head" if name.startswith("lm_head") else
                "Conv1D" if type(mod).__name__ in _UNSUPPORTED_LINEAR_TYPES else
                "fused-experts" if p.dim() >= 3 else
                "linear" if isinstance(mod, nn.Linear) else "other")
        untargeted.append({"name": name, "shape": list(p.shape), "params": int(p.numel()), "kind": kind})
    untargeted.sort(key=lambda u: -u["params"])
    return {"model_params": int(total), "targeted_params": int(covered),
            "targeted_fraction": covered / max(1, total), "untargeted": untargeted}


def check_context(model: nn.Module, seqlen: int, what: str = "--seqlen") -> None:
    """Refuse windows longer than a learned-position model can embed (OPT, GPT-2): a ``ConfigError``.

    Rotary models (Llama, Qwen, …) have no such table and are not limited here.
    """
    cfg = getattr(model, "config", None)
    learned = [n for n, m in model.named_modules()
               if isinstance(m, nn.Embedding) and n.rsplit(".", 1)[-1] in ("embed_positions", "wpe", "position_embeddings")]
    if not learned:
        return
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if limit is not None and int(seqlen) > int(limit):
        raise ConfigError(f"{what} {seqlen}: {type(model).__name__} has learned position embeddings "
                          f"({learned[0]}) for at most {limit} tokens; use {what} {limit} or less")


# --------------------------------------------------------------------------- running the trunk


def input_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s input embeddings (where its input ids go), else of its first parameter."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    w = getattr(emb, "weight", None)
    if isinstance(w, torch.Tensor):
        return w.device
    return next(model.parameters()).device


def trunk(model: nn.Module, linears: dict[str, nn.Linear]) -> nn.Module:
    """The sub-module that runs every targeted Linear without the LM head, else ``model``.

    A Hugging Face causal LM's ``base_model`` (``LlamaForCausalLM.model``) returns hidden
    states; skipping the ``[vocab, d]`` head saves ~19 % of SmolLM2-135M's forward FLOPs. Used
    only when it takes ``input_ids`` and contains every targeted Linear (``linears``: {name: module}).
    """
    base = getattr(model, "base_model", None)
    if not isinstance(base, nn.Module) or base is model:
        return model
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return model
    inside = {id(m) for m in base.modules()}
    if "input_ids" not in params or any(id(m) not in inside for m in linears.values()):
        return model
    return base


def accepts_position_ids(runner: nn.Module) -> bool:
    """Whether ``runner.forward`` takes ``position_ids`` (then padded windows get real-token positions)."""
    try:
        return "position_ids" in inspect.signature(runner.forward).parameters
    except (TypeError, ValueError):
        return False


def forward_kwargs(ids: torch.Tensor, mask: Optional[torch.Tensor], accepts_pos: bool) -> dict[str, Any]:
    """Keyword arguments of one forward over ``ids`` [B, T] with ``mask`` [B, T] (None: no padding).

    With padding, positions count real tokens only (``cumsum(mask) − 1``), so a left-padded window
    sees the rotary phases of its unpadded self, where the model accepts ``position_ids``.
    """
    kwargs: dict[str, Any] = {"input_ids": ids, "use_cache": False}
    if mask is not None:
        kwargs["attention_mask"] = mask
        if accepts_pos:
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)
    return kwargs
