"""vLLM's side of an obdk checkpoint: the quantization config and the Linear method (imports vLLM).

``ObdkVllmConfig`` is built by vLLM from ``config.json``'s ``quantization_config`` (``ranks``: the
rank of every low-rank module, by its name in the checkpoint). vLLM asks it for a method per layer
(``get_quant_method(layer, prefix)``); ``create_weights`` gets no module name, so the layer's
members (``q_proj``/``k_proj``/``v_proj`` of a fused ``qkv_proj``, through the model's
``packed_modules_mapping``) and their ranks are fixed there. A Linear with no low-rank member gets
vLLM's ``UnquantizedLinearMethod``; every other one an ``ObdkLinearMethod``, whose parameters are

* ``weight_a`` [Σ r, in_local]: the low-rank members' ``a`` stacked (one shrink GEMM for members
  that share the input), whole on column-parallel ranks, their input columns on row-parallel ranks;
* ``weight_b`` 1-D: each low-rank member's rows of ``b`` on this rank, [out_local, r] row-major, one
  after another (the layout of ``obdk::lowrank_linear_grouped``);
* ``weight`` [Σ out_local of the dense members, in_local]: members kept dense, as stored; with none,
  an empty sink for the empty ``<module>.weight`` tombstones the checkpoint stores for low-rank modules.

Every parameter has its own loader (vLLM's ``weight_loader_v2`` narrows along an output dimension
that ``weight_a`` does not have), which reads the q/k/v or gate/up shard id from its argument or
from ``loaded_weight.shard_id``, checks the stored shape against the rank, and refuses non-finite
values. ``apply`` runs ``obdk::lowrank_linear`` (one low-rank member) or
``obdk::lowrank_linear_grouped`` (several), torch.library ops with fake implementations, so
vLLM's torch.compile and CUDA graphs trace them as single nodes; their backends are obdk's (C++ on
CPU, Triton/CUDA on GPU, chosen per device by :mod:`obdk.backends`).

obdk internals used here: ``obdk.io.QUANT_METHOD``, ``obdk.io.check_quantization_config``,
``obdk.io.tensor_index``, ``obdk.errors``, the ops ``obdk::lowrank_linear`` (``obdk.ops``) and
``obdk::lowrank_linear_grouped`` with its meta table (``obdk.nn._grouped_meta``).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.nn import Parameter
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    LinearBase,
    LinearMethodBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

from .. import ops  # noqa: F401  (declares obdk::lowrank_linear)
from ..errors import CheckpointError, UnsupportedModelError
from ..io import QUANT_METHOD, check_quantization_config, tensor_index
from ..nn import _grouped_meta  # also declares obdk::lowrank_linear_grouped
from .layout import LinearLayout, check_factor_headers, column_segments, full_segments, members_for

log = logging.getLogger(__name__)

_QKV = {"q": 0, "k": 1, "v": 2}
_PARAM = {"a": "weight_a", "b": "weight_b", "w": "weight"}


class ObdkVllmConfig(QuantizationConfig):
    """``quantization_config`` of an obdk checkpoint, as vLLM uses it: ``ranks`` {module: rank}.

    Module level (vLLM pickles it into its engine processes). ``from_config`` validates the method,
    format version and ranks; ``maybe_update_config`` (run before any engine process starts, with
    the checkpoint directory) checks every low-rank module's stored factors against its rank from
    the safetensors headers, so a corrupt checkpoint fails in the calling process with one line.
    """

    def __init__(self, ranks: dict[str, int], raw: Optional[dict] = None):
        super().__init__()
        self.ranks = dict(ranks)
        self.raw = dict(raw or {})
        self.claimed: set[str] = set()

    def __repr__(self) -> str:
        return f"ObdkVllmConfig({len(self.ranks)} low-rank modules)"

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.float16, torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 70  # obdk's Triton kernels (sm_70+); its CUDA C++ kernels check the device themselves

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # everything is in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ObdkVllmConfig":
        if hasattr(config, "to_dict"):
            config = config.to_dict()
        q = check_quantization_config(dict(config), "config.json")
        return cls(q["ranks"], q)

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        """Rename the ranks' module names as the model renames its weights (HF → vLLM names)."""
        out = {}
        for name, r in self.ranks.items():
            new = hf_to_vllm_mapper.map_name(name + ".weight_a")
            out[new[: -len(".weight_a")] if new and new.endswith(".weight_a") else name] = r
        self.ranks = out

    def maybe_update_config(self, model_name: str, hf_config=None, revision: Optional[str] = None) -> None:
        if not os.path.isdir(model_name):
            log.info("obdk: %s is not a local directory; its factors are checked as they load", model_name)
            return
        check_factor_headers(model_name, self.ranks, tensor_index(model_name))

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, ParallelLMHead):
            self._check_claimed(prefix)
            return None
        if not isinstance(layer, LinearBase):
            return None
        parent, _, last = prefix.rpartition(".")
        names = [f"{parent}.{n}" if parent else n for n in self.packed_modules_mapping.get(last, [last])]
        self.claimed.update(names)
        if not any(n in self.ranks for n in names):
            return UnquantizedLinearMethod()
        return ObdkLinearMethod(prefix, names, {n: self.ranks[n] for n in names if n in self.ranks})

    def _check_claimed(self, prefix: str) -> None:
        """At the LM head (built after the decoder layers): every low-rank module must have found its Linear."""
        try:
            from vllm.distributed import get_pp_group
            if get_pp_group().world_size > 1:
                return  # this rank builds only its stages' layers
        except Exception:  # noqa: BLE001  (no distributed state: unit tests)
            pass
        lost = sorted(n for n in self.ranks if n not in self.claimed)
        if lost and self.claimed:
            mapping = dict(self.packed_modules_mapping)
            raise UnsupportedModelError(
                f"obdk: quantization_config.ranks names {lost[0]}" + (f" (and {len(lost) - 1} more)" if len(lost) > 1 else "")
                + f", which no Linear of vLLM's model serves (its fused layers map {mapping}); this architecture "
                "mapping is unknown to obdk's vLLM plugin")


def _shard_segments(layer, shard_id) -> Optional[tuple[int, ...]]:
    """The output segments a checkpoint tensor with vLLM's ``shard_id`` fills (None: all, fused on disk)."""
    if shard_id is None:
        return None
    if isinstance(shard_id, str):
        if shard_id not in _QKV:
            raise CheckpointError(f"{layer.prefix}: unknown shard id {shard_id!r}")
        return (_QKV[shard_id],)
    if isinstance(shard_id, int):
        return (shard_id,)
    return tuple(int(s) for s in shard_id)


def _layout(layer, prefix: str, names: list[str], ranks: dict[str, int], input_size_per_partition: int,
            output_partition_sizes: list[int]) -> LinearLayout:
    """The :class:`LinearLayout` of vLLM Linear ``layer`` on its tensor-parallel rank."""
    tp_rank, tp_size = getattr(layer, "tp_rank", 0), getattr(layer, "tp_size", 1)
    in_start = 0
    if isinstance(layer, QKVParallelLinear):
        v_head = getattr(layer, "v_head_size", layer.head_size)
        sizes = [layer.total_num_heads * layer.head_size, layer.total_num_kv_heads * layer.head_size,
                 layer.total_num_kv_heads * v_head]
        rep = layer.num_kv_head_replicas
        segs = column_segments(sizes, tp_rank, tp_size, [1, rep, rep])
    elif isinstance(layer, MergedColumnParallelLinear):
        segs = column_segments(list(layer.output_sizes), tp_rank, tp_size)
    elif type(layer) in (ColumnParallelLinear,):
        segs = column_segments([layer.output_size], tp_rank, tp_size)
    elif type(layer) is RowParallelLinear:
        segs = full_segments([layer.output_size])
        in_start = tp_rank * input_size_per_partition
    elif type(layer) is ReplicatedLinear:
        segs = full_segments([layer.output_size])
    else:
        raise UnsupportedModelError(f"obdk: {prefix} is a vLLM {type(layer).__name__}, a Linear layout obdk's vLLM "
                                    f"plugin does not know; cannot serve its low-rank modules {sorted(ranks)}")
    if [s.size for s in segs] != list(output_partition_sizes):
        raise UnsupportedModelError(f"obdk: {prefix} ({type(layer).__name__}) has output partitions "
                                    f"{list(output_partition_sizes)} on rank {tp_rank} of {tp_size}, not the "
                                    f"{[s.size for s in segs]} obdk derives; cannot place its factors")
    members = members_for(prefix, names, len(segs), ranks)
    return LinearLayout(prefix, members, segs, in_global=layer.input_size, in_local=input_size_per_partition,
                        in_start=in_start)


def _finite(t: torch.Tensor, what: str) -> None:
    if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
        raise CheckpointError(f"obdk: {what} holds NaN/Inf; the checkpoint is corrupt")


class ObdkLinearMethod(LinearMethodBase):
    """One vLLM Linear of an obdk checkpoint: its low-rank members as factors, its dense members dense.

    ``prefix``: the Linear's name in vLLM; ``names``: its members' module names in the checkpoint;
    ``ranks``: the rank of each low-rank member (the others are dense).
    """

    def __init__(self, prefix: str, names: list[str], ranks: dict[str, int]):
        self.prefix, self.names, self.ranks = prefix, list(names), dict(ranks)

    # ------------------------------------------------------------------ parameters

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs):
        """Parameters ``weight_a`` [Σr, in_local], ``weight_b`` [Σ out_local·r] and ``weight``
        [Σ dense out_local, in_local] of ``layer`` (module docstring), each with its own loader."""
        L = _layout(layer, self.prefix, self.names, self.ranks, input_size_per_partition, output_partition_sizes)
        layer.obdk_layout = L
        layer.obdk_loaded = set()
        kw = dict(dtype=params_dtype)
        layer.register_parameter("weight_a", Parameter(torch.empty(L.a_rows, L.in_local, **kw), requires_grad=False))
        layer.register_parameter("weight_b", Parameter(torch.empty(L.b_numel, **kw), requires_grad=False))
        layer.register_parameter("weight", Parameter(torch.empty(L.dense_rows, L.in_local, **kw), requires_grad=False))
        layer.weight_a.weight_loader = self._loader(layer, "a")
        layer.weight_b.weight_loader = self._loader(layer, "b")
        layer.weight.weight_loader = self._loader(layer, "w")
        layer.register_buffer("obdk_meta", _grouped_meta(L.ranks, L.outs).to(layer.weight_a.device), persistent=False)

    def _loader(self, layer, which: str):
        def load(param: Parameter, loaded: torch.Tensor, shard_id=None) -> None:
            if shard_id is None:
                shard_id = getattr(loaded, "shard_id", None)
            self.load(layer, which, param, loaded, shard_id)
        return load

    def load(self, layer, which: str, param: Parameter, loaded: torch.Tensor, shard_id) -> None:
        """Copy the rows (and, row-parallel, the columns) of stored tensor ``loaded`` that this rank keeps.

        ``which``: ``a``/``b`` (a low-rank member's factor) or ``w`` (a dense member's weight, or the
        empty tombstone of a low-rank one); ``shard_id``: vLLM's id of the member inside a fused Linear.
        """
        L: LinearLayout = layer.obdk_layout
        i = L.member_for(_shard_segments(layer, shard_id))
        m = L.members[i]
        tensor = f"{m.name}.{_PARAM[which]}"
        if which == "w" and loaded.numel() == 0:
            if not m.lowrank:
                raise CheckpointError(f"obdk: tensor {tensor!r} is empty but {m.name} is not in quantization_config.ranks")
            return  # the tombstone of a low-rank module
        if (which == "w") == m.lowrank:
            kind = f"low-rank (rank {m.rank})" if m.lowrank else "dense"
            raise CheckpointError(f"obdk: tensor {tensor!r} does not fit {m.name}, which quantization_config.ranks "
                                  f"makes {kind}")
        rows = L.global_rows(i)
        want = {"a": (m.rank, L.in_global), "b": (rows, m.rank), "w": (rows, L.in_global)}[which]
        if tuple(loaded.shape) != want:
            hint = f" (quantization_config.ranks says rank {m.rank})" if m.lowrank else ""
            raise CheckpointError(f"obdk: tensor {tensor!r} has shape {list(loaded.shape)}, expected {list(want)}{hint}")
        _finite(loaded, f"tensor {tensor!r}")
        with torch.no_grad():
            if which in ("a", "w") and L.in_local != L.in_global:  # row-parallel: this rank's input columns
                loaded = loaded.narrow(1, L.in_start, L.in_local)
            if which in ("b", "w"):  # this rank's output rows, segment by segment
                loaded = torch.cat([loaded.narrow(0, s, n) for s, n in L.row_slices(i)])
            if which == "a":
                param.data.narrow(0, L.a_offset(i), m.rank).copy_(loaded)
            elif which == "b":
                param.data.narrow(0, L.b_offset(i), loaded.numel()).view_as(loaded).copy_(loaded)
            else:
                param.data.narrow(0, L.dense_offset(i), loaded.shape[0]).copy_(loaded)
        layer.obdk_loaded.add((i, which))

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Refuse a Linear whose members did not all load; keep ``weight_b``'s 2-D view for one low-rank member."""
        L: LinearLayout = layer.obdk_layout
        for i, m in enumerate(L.members):
            for which in (("a", "b") if m.lowrank else ("w",)):
                if (i, which) not in layer.obdk_loaded:
                    raise CheckpointError(f"obdk: tensor '{m.name}.{_PARAM[which]}' is missing from the checkpoint "
                                          f"({'rank ' + str(m.rank) if m.lowrank else 'dense'} in quantization_config)")
        layer.obdk_meta = layer.obdk_meta.to(layer.weight_a.device)
        if len(L.lowrank) == 1:
            layer.obdk_b2d = layer.weight_b.data.view(L.outs[0], L.ranks[0])

    # ------------------------------------------------------------------ forward

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``y = x Wᵀ + bias`` [..., Σ out_local] for ``x`` [..., in_local]: low-rank members through obdk's
        op (one shrink GEMM over the stacked ``a``), dense members through one GEMM, in output order."""
        L: LinearLayout = layer.obdk_layout
        if L.in_order:
            return self._lowrank(layer, L, x, bias)
        y_lr = self._lowrank(layer, L, x, None) if L.lowrank else None
        y_d = F.linear(x, layer.weight)
        y = torch.cat([(y_lr if kind == "lowrank" else y_d).narrow(-1, off, n) for kind, off, n in L.pieces], dim=-1)
        return y if bias is None else y.add_(bias)

    @staticmethod
    def _lowrank(layer, L: LinearLayout, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if len(L.lowrank) == 1:
            return torch.ops.obdk.lowrank_linear(x, layer.weight_a, layer.obdk_b2d, bias)
        return torch.ops.obdk.lowrank_linear_grouped(x, layer.weight_a, layer.weight_b, layer.obdk_meta, L.ranks,
                                                     L.outs, bias)
