"""How many bytes calibration statistics take.

Memory (fp32, shared inputs deduplicated; fp64 doubles every number)
--------------------------------------------------------------------
Per decoder layer ``C_x`` holds 2·d² (q/k/v input, gate/up input) + d² (o input) + ffn² (down
input) values; ``C_g`` holds the squares of the q, k, v, o, gate, up output sizes and d² (down).

| model                | C_x                              | C_g                               | total                  |
|----------------------|----------------------------------|-----------------------------------|------------------------|
| Llama-7B, per layer  | 171,507,712 values = 654.25 MiB  | 326,238,208 values = 1,244.50 MiB | 1,898.75 MiB           |
| Llama-7B, 32 layers  | 5,488,246,784 v = 20.45 GiB      | 10,439,622,656 v = 38.89 GiB      | 59.34 GiB (63.71 GB)   |
| Llama-70B, per layer | 1,023,410,176 values = 3,904 MiB | 1,847,590,912 values = 7,048 MiB  | 10,952 MiB (10.70 GiB) |
| Llama-70B, 80 layers | 81,872,814,080 v = 305.0 GiB     | 147,807,272,960 v = 550.6 GiB     | 855.6 GiB (918.7 GB)   |

(Llama-7B: d=4096, ffn=11008, MHA, so every attention output is d. Llama-70B: d=8192,
ffn=28672, GQA with 8 kv heads, so k/v outputs are 1024 wide.) The optional ``grad``
statistic adds one fp32 m×n matrix per Linear: 24.1 GiB for Llama-7B.

How obdk keeps this within a GPU:

* accumulators are fp32 (fp64 only on request), one ``C_x`` per unique input (deduplication
  saves 3·d² per layer: 6 GiB on Llama-7B), activations stay in the model's 16-bit dtype (the
  ``gram_acc_`` op converts at most 64 MiB of rows at a time), and no ``dW`` is ever formed;
* every accumulator is allocated on the device of its own Linear, so a model split over GPUs
  with a ``device_map`` splits its statistics the same way;
* ``offload=True``: after the last window every accumulator is all-reduced, normalised in
  place and copied to host memory *one at a time*, its device copy freed before the next, so
  the result never needs a second copy on the GPU. Offloading a layer earlier is not
  possible in a single pass (each window adds to every layer until the last one), and doing
  it during the last backward would not lower the peak, which is reached before;
* the loss of a backward pass runs one window at a time from the LM head's weight
  (:mod:`obdk.calibrate.head`): never the ``[B, T, vocab]`` logits of a batch with their fp32
  copy and gradient (4 windows of 2048 tokens at Llama's vocabulary of 32,000: 1 GiB per fp32 copy);
* the statistics of a model that does not fit are not sliced into several whole-model passes
  (the old ``layer_slices``, one forward+backward over the data per slice): the layer-streamed
  pass (:func:`obdk.calibrate.stream.calibrate_streamed`, ``obdk compress --stream``) holds one
  decoder layer's statistics at a time at the cost of one recomputed layer forward, with the
  same statistics (Llama-7B: 1.85 GiB instead of 59.3 GiB; Llama-70B: 10.7 GiB instead of 855.6 GiB).
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from ..errors import ConfigError

__all__ = ["stats_nbytes"]


def _resolve_groups(model: nn.Module, groups) -> tuple[list, dict[str, nn.Linear]]:
    from ..models import linear_groups
    groups = list(linear_groups(model) if groups is None else groups)
    if not groups:
        raise ConfigError(f"calibrate: no targeted Linears in {type(model).__name__}")
    mods = dict(model.named_modules())
    linears: dict[str, nn.Linear] = {}
    for g in groups:
        first = None
        for name in g.names:
            m = mods.get(name)
            if m is None:
                raise ConfigError(f"calibrate: group {g.key} names {name!r}, which is not a module of {type(model).__name__}")
            if not isinstance(m, nn.Linear):
                raise ConfigError(f"calibrate: {name} is a {type(m).__name__}, not an nn.Linear (already compressed?)")
            if name in linears:
                raise ConfigError(f"calibrate: {name} appears in more than one group")
            if first is not None and m.in_features != first.in_features:
                raise ConfigError(f"calibrate: group {g.key} mixes inputs of width {first.in_features} and "
                                 f"{m.in_features} ({name}); members of a group must read one tensor")
            first = first or m
            linears[name] = m
    return groups, linears


def stats_nbytes(model: nn.Module, stats: Iterable[str] = ("cx", "cg"), dtype: torch.dtype = torch.float32,
                 groups=None) -> int:
    """Bytes the statistics ``stats`` of ``model`` (or of ``groups``) need in ``dtype``."""
    groups, lin = _resolve_groups(model, groups)
    return sum(_group_nbytes(g, lin, set(stats), dtype) for g in groups)


def _group_nbytes(g, lin: dict[str, nn.Linear], stats: set[str], dtype: torch.dtype) -> int:
    es = torch.empty((), dtype=dtype).element_size()
    n = lin[g.names[0]].in_features
    total = n * n if "cx" in stats else 0
    for name in g.names:
        m = lin[name]
        total += m.out_features ** 2 if "cg" in stats else 0
        total += m.out_features * m.in_features if "grad" in stats else 0
    return total * es
