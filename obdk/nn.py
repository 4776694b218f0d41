"""Modules that serve a compressed model.

* ``LowRankLinear`` — two factors, bias kept: ``weight_a`` [r, in], ``weight_b``
  [out, r], ``y = (x aᵀ) bᵀ + bias`` through the ``obdk::lowrank_linear`` op, whose
  backend is picked by device and dtype (``OBDK_BACKEND`` forces one); the Triton
  and CUDA backends choose their decode (M ≤ 16 rows) or prefill path by shape.
* ``PackedLowRankLinear`` — several ``LowRankLinear`` that read the same input
  (q/k/v; gate/up) served together: one shrink GEMM over the stacked ``a`` factors
  [Σr_g, in] and one grouped (block-diagonal) expand, through the
  ``obdk::lowrank_linear_grouped`` op (Triton grouped kernel when the
  ``lowrank_linear`` backend is Triton, else one GEMM plus a per-member loop).
* ``pack_shared_inputs(model)`` installs packed modules in a Hugging Face model
  without touching its modelling class: every packed Linear slot gets a thin
  ``PackedSlice`` proxy that returns its slice of the shared result, computed once
  per input tensor. ``unpack_shared_inputs(model)`` restores ``LowRankLinear``
  modules (e.g. before ``save_pretrained``).
"""
from __future__ import annotations

import logging
import math
from typing import Iterable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .arguments import check_ints, check_model
from .backends import select
from .errors import DataError, WrongTypeError
from .models import set_module

log = logging.getLogger(__name__)

__all__ = ["LowRankLinear", "PackedLowRankLinear", "PackedSlice", "pack_shared_inputs",
           "unpack_shared_inputs", "shared_input_groups", "lowrank_linear_grouped"]


class LowRankLinear(nn.Module):
    """Drop-in replacement of ``nn.Linear(in_features, out_features)`` by two factors.

    Parameters: ``weight_a`` [rank, in_features], ``weight_b`` [out_features, rank],
    ``bias`` [out_features] or None. Input [..., in_features] → output [..., out_features].
    The constructor leaves the factors uninitialised (``reset_parameters`` fills them).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        check_ints("LowRankLinear", in_features=in_features, out_features=out_features, rank=rank)
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.weight_a = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.weight_b = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None

    @classmethod
    def from_factors(cls, a: Tensor, b: Tensor, bias: Optional[Tensor] = None) -> "LowRankLinear":
        """Build from ``a`` [r, in] and ``b`` [out, r] (and ``bias`` [out]); tensors are copied."""
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise DataError(f"LowRankLinear.from_factors: need a [r, in] and b [out, r], got {tuple(a.shape)} and {tuple(b.shape)}")
        mod = cls(a.shape[1], b.shape[0], a.shape[0], bias=bias is not None, device=a.device, dtype=a.dtype)
        with torch.no_grad():
            mod.weight_a.copy_(a)
            mod.weight_b.copy_(b.to(a.dtype))
            if bias is not None:
                mod.bias.copy_(bias.to(a.dtype))
        return mod

    @torch.no_grad()
    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> "LowRankLinear":
        """Random factors whose product has ``nn.Linear``'s output scale (for benchmarks and tests):
        ``a`` ~ N(0, 1/in), ``b`` ~ N(0, 1/(3·rank)) so ``y`` has variance ≈ |x|²/(3·in)."""
        dev = generator.device if generator is not None else self.weight_a.device
        for p, std in ((self.weight_a, 1.0 / math.sqrt(self.in_features)),
                       (self.weight_b, 1.0 / math.sqrt(3 * self.rank))):
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32, device=dev).mul_(std))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            self.bias.copy_(torch.empty(self.bias.shape, dtype=torch.float32, device=dev)
                            .uniform_(-bound, bound, generator=generator))
        return self

    @property
    def weight(self) -> Tensor:
        """The dense equivalent ``b @ a`` [out, in] (materialised on each access)."""
        return self.weight_b @ self.weight_a

    def forward(self, x: Tensor) -> Tensor:
        return ops.lowrank_linear(x, self.weight_a, self.weight_b, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}"


# --------------------------------------------------------------------------- grouped op


def _grouped_meta(ranks: Sequence[int], outs: Sequence[int]) -> Tensor:
    """int64 [G, 5]: (m_g, output column offset, t column offset, flat-b offset, r_g)."""
    rows, col0, k0, boff = [], 0, 0, 0
    for r, m in zip(ranks, outs):
        rows.append((m, col0, k0, boff, r))
        col0, k0, boff = col0 + m, k0 + r, boff + m * r
    return torch.tensor(rows, dtype=torch.int64)


def _check_grouped(x: Tensor, a_cat: Tensor, b_flat: Tensor, meta: Tensor, ranks: Sequence[int],
                   outs: Sequence[int], bias: Optional[Tensor]) -> None:
    if len(ranks) != len(outs) or not ranks:
        raise DataError(f"lowrank_linear_grouped: ranks {list(ranks)} and outs {list(outs)} must be non-empty and match")
    if a_cat.dim() != 2 or a_cat.shape[0] != sum(ranks) or x.shape[-1] != a_cat.shape[1]:
        raise DataError(f"lowrank_linear_grouped: a_cat must be [{sum(ranks)}, {x.shape[-1]}], got {tuple(a_cat.shape)}")
    if b_flat.dim() != 1 or b_flat.numel() != sum(r * m for r, m in zip(ranks, outs)):
        raise DataError(f"lowrank_linear_grouped: b_flat must be 1-D of Σ m_g·r_g = {sum(r * m for r, m in zip(ranks, outs))} "
                         f"elements, got {tuple(b_flat.shape)}")
    if meta.shape != (len(ranks), 5):
        raise DataError(f"lowrank_linear_grouped: meta must be [{len(ranks)}, 5], got {tuple(meta.shape)}")
    if bias is not None and bias.shape != (sum(outs),):
        raise DataError(f"lowrank_linear_grouped: bias must be [{sum(outs)}], got {tuple(bias.shape)}")


def _grouped_torch(x: Tensor, a_cat: Tensor, b_flat: Tensor, ranks: Sequence[int], outs: Sequence[int],
                   bias: Optional[Tensor]) -> Tensor:
    """One GEMM over the stacked ``a`` factors, then one GEMM per member on its slice of ``t``."""
    t = x @ a_cat.T
    ys, k0, boff, col0 = [], 0, 0, 0
    for r, m in zip(ranks, outs):
        b = b_flat[boff:boff + m * r].view(m, r)
        ys.append(F.linear(t[..., k0:k0 + r], b, None if bias is None else bias[col0:col0 + m]))
        k0, boff, col0 = k0 + r, boff + m * r, col0 + m
    return torch.cat(ys, dim=-1)


# Declared here, next to its only user (the packed modules); same dispatch as obdk::lowrank_linear.
@torch.library.custom_op("obdk::lowrank_linear_grouped", mutates_args=())
def lowrank_linear_grouped(x: Tensor, a_cat: Tensor, b_flat: Tensor, meta: Tensor, ranks: list[int],
                           outs: list[int], bias: Optional[Tensor] = None) -> Tensor:
    """Packed factors sharing ``x``: ``y[..., Σm] = cat_g((x a_catᵀ)[..., r_g-slice] b_gᵀ) + bias``.

    ``a_cat`` [Σr_g, n] (the members' ``a`` stacked), ``b_flat`` 1-D (the row-major
    ``b_g`` [m_g, r_g] concatenated), ``meta`` the int64 [G, 5] table of
    :func:`_grouped_meta` on x's device, ``bias`` [Σm_g] or None. The backend is the
    one ``obdk::lowrank_linear`` would use: Triton runs a grouped kernel, every other
    backend one GEMM plus a GEMM per member.
    """
    _check_grouped(x, a_cat, b_flat, meta, ranks, outs, bias)
    backend = select("lowrank_linear", x.device, x.dtype).backend
    if backend == "triton":
        from .kernels.lowrank import lowrank_grouped_triton
        return lowrank_grouped_triton(x, a_cat, b_flat, meta, outs, bias)
    return _grouped_torch(x, a_cat, b_flat, ranks, outs, bias)


@lowrank_linear_grouped.register_fake
def _(x, a_cat, b_flat, meta, ranks, outs, bias=None):
    return x.new_empty((*x.shape[:-1], sum(outs)))


# --------------------------------------------------------------------------- packed modules


class PackedLowRankLinear(nn.Module):
    """``LowRankLinear`` members that read the same input, served by one shrink and one grouped expand.

    Parameters: ``weight_a`` [Σr_g, in] (members' ``a`` stacked), ``weight_b`` 1-D (members'
    row-major ``b`` concatenated), ``bias`` [Σout_g] (zeros for members without one) or None.
    ``forward(x)`` returns the tuple of member outputs (views of one [..., Σout_g] tensor).
    """

    def __init__(self, in_features: int, out_features: Sequence[int], ranks: Sequence[int], bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        if len(out_features) != len(ranks) or not ranks or min(ranks) <= 0:
            raise DataError(f"PackedLowRankLinear: need one positive rank per member, got ranks {list(ranks)} "
                             f"for outputs {list(out_features)}")
        kw = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = tuple(int(m) for m in out_features)
        self.ranks = tuple(int(r) for r in ranks)
        self.weight_a = nn.Parameter(torch.empty(sum(self.ranks), in_features, **kw))
        self.weight_b = nn.Parameter(torch.empty(sum(r * m for r, m in zip(self.ranks, self.out_features)), **kw))
        self.bias = nn.Parameter(torch.empty(sum(self.out_features), **kw)) if bias else None
        self.register_buffer("meta", _grouped_meta(self.ranks, self.out_features).to(device), persistent=False)
        self._cache: Optional[list] = None

    @classmethod
    def from_modules(cls, members: Sequence[LowRankLinear]) -> "PackedLowRankLinear":
        """Pack ``members`` (same ``in_features``, dtype and device); tensors are copied."""
        if not members:
            raise DataError("PackedLowRankLinear.from_modules: no members")
        first = members[0]
        for m in members:
            if not isinstance(m, LowRankLinear):
                raise WrongTypeError(f"PackedLowRankLinear.from_modules: {type(m).__name__} is not a LowRankLinear")
            if (m.in_features, m.weight_a.dtype, m.weight_a.device) != (first.in_features, first.weight_a.dtype,
                                                                        first.weight_a.device):
                raise DataError("PackedLowRankLinear.from_modules: members differ in in_features, dtype or device")
        has_bias = any(m.bias is not None for m in members)
        mod = cls(first.in_features, [m.out_features for m in members], [m.rank for m in members], bias=has_bias,
                  device=first.weight_a.device, dtype=first.weight_a.dtype)
        with torch.no_grad():
            mod.weight_a.copy_(torch.cat([m.weight_a for m in members]))
            mod.weight_b.copy_(torch.cat([m.weight_b.reshape(-1) for m in members]))
            if has_bias:
                mod.bias.copy_(torch.cat([m.bias if m.bias is not None else m.weight_b.new_zeros(m.out_features)
                                          for m in members]))
        return mod

    def member(self, i: int) -> LowRankLinear:
        """Member ``i`` rebuilt as a standalone ``LowRankLinear`` (tensors copied)."""
        k0, boff, col0 = sum(self.ranks[:i]), sum(r * m for r, m in zip(self.ranks[:i], self.out_features[:i])), \
            sum(self.out_features[:i])
        r, m = self.ranks[i], self.out_features[i]
        bias = None if self.bias is None else self.bias[col0:col0 + m]
        return LowRankLinear.from_factors(self.weight_a[k0:k0 + r].detach(),
                                          self.weight_b[boff:boff + m * r].detach().view(m, r),
                                          None if bias is None else bias.detach())

    def forward_cat(self, x: Tensor) -> Tensor:
        """All member outputs concatenated: [..., Σout_g]."""
        return lowrank_linear_grouped(x, self.weight_a, self.weight_b, self.meta, list(self.ranks),
                                      list(self.out_features), self.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.forward_cat(x).split(self.out_features, dim=-1))

    def shared_output(self, x: Tensor, i: int) -> Tensor:
        """Member ``i``'s output for ``x``, computing all members once per input tensor.

        The result is cached on the identity (and version) of ``x`` until every member
        has taken its slice, so no activation outlives the layer's forward.
        """
        version = _version(x)
        c = self._cache
        if c is None or c[0] is not x or c[1] != version:
            c = self._cache = [x, version, self.forward(x), 0]
        c[3] += 1
        out = c[2][i]
        if c[3] >= len(self.ranks):
            self._cache = None
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, ranks={self.ranks}, "
                f"bias={self.bias is not None}")


def _version(x: Tensor):
    try:
        return x._version
    except RuntimeError:  # inference tensors have no version counter
        return None


class PackedSlice(nn.Module):
    """Stands in a packed Linear's slot: ``forward(x)`` returns member ``index`` of ``packed``.

    The first slice of a group registers the ``PackedLowRankLinear`` as its child
    ``packed`` (so it moves with ``model.to`` and appears once in ``state_dict``); the
    others hold an unregistered reference to the same module.
    """

    def __init__(self, packed: PackedLowRankLinear, index: int, owner: bool):
        super().__init__()
        if owner:
            self.packed = packed
        else:
            self.__dict__["_packed_ref"] = packed
        self.index = index
        self.in_features = packed.in_features
        self.out_features = packed.out_features[index]
        self.rank = packed.ranks[index]

    @property
    def shared(self) -> PackedLowRankLinear:
        return self._modules["packed"] if "packed" in self._modules else self.__dict__["_packed_ref"]

    def forward(self, x: Tensor) -> Tensor:
        return self.shared.shared_output(x, self.index)

    def extra_repr(self) -> str:
        return f"index={self.index}, in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def shared_input_groups(model: nn.Module) -> list:
    """The shared-input groups (``LinearGroup``) of ``model`` counting ``LowRankLinear`` members.

    :func:`obdk.models.linear_groups` over ``nn.Linear`` and ``LowRankLinear`` (the map that
    calibration uses sees only ``nn.Linear``, i.e. the model before compression).
    """
    from .models import linear_groups
    return linear_groups(model, types=(nn.Linear, LowRankLinear))


def pack_shared_inputs(model: nn.Module, groups: Optional[Iterable] = None) -> list[PackedLowRankLinear]:
    """Pack the ``LowRankLinear`` members of each shared-input group of ``model`` in place.

    ``groups``: ``LinearGroup``-like objects with ``names`` (full module names), e.g.
    :func:`obdk.models.linear_groups` taken before compression; by default
    :func:`shared_input_groups` of the compressed ``model``. Within a group only the
    ``LowRankLinear`` members are packed; members kept dense (``nn.Linear``) stay where
    they are and run as before (packing a dense weight would need an identity expand).
    A group with fewer than two low-rank members is left alone, as is one whose
    members differ in dtype or device. Returns the packed modules created.
    """
    check_model("pack_shared_inputs", model)
    if groups is None:
        groups = shared_input_groups(model)
    created: list[PackedLowRankLinear] = []
    for grp in groups:
        names = [n for n in grp.names if isinstance(_get(model, n), LowRankLinear)]
        if len(names) < 2:
            continue
        members = [model.get_submodule(n) for n in names]
        if len({(m.in_features, m.weight_a.dtype, m.weight_a.device) for m in members}) != 1:
            log.info("not packing %s: members differ in in_features, dtype or device", names)
            continue
        packed = PackedLowRankLinear.from_modules(members)
        packed.train(members[0].training)
        for i, name in enumerate(names):
            set_module(model, name, PackedSlice(packed, i, owner=i == 0))
        created.append(packed)
    log.info("packed %d shared-input groups of low-rank Linears", len(created))
    return created


def _get(model: nn.Module, name: str) -> Optional[nn.Module]:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def unpack_shared_inputs(model: nn.Module) -> int:
    """Undo :func:`pack_shared_inputs`: every ``PackedSlice`` becomes a ``LowRankLinear`` again.

    Returns the number of modules restored.
    """
    slots = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, PackedSlice)]
    for name, sl in slots:
        new = sl.shared.member(sl.index)
        new.train(sl.training)
        set_module(model, name, new)
    return len(slots)
