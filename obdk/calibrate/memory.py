"""How many bytes calibration statistics take, and slices of a model that fit a byte budget.

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
* ``groups=`` restricts a pass to a slice of the Linears: :func:`layer_slices` plans slices
  under a byte budget and :meth:`Statistics.merge` joins the passes (each pass costs one
  forward+backward over the data). Llama-7B on an 80 GB H100: 59.3 GiB of statistics next to
  12.6 GiB of bf16 weights leaves too little for activations, two passes of 16 layers
  (29.7 GiB each) fit. Llama-70B needs 10.7 GiB per layer and its bf16 weights (131 GiB)
  already span several GPUs: even over 8 × 80 GB the full 855.6 GiB (107 GiB per GPU) does
  not fit, so it is calibrated in slices (e.g. 4 layers = 42.8 GiB per pass on one GPU, or
  32 layers ≈ 43 GiB per GPU per pass over 8), each finished slice going to host memory
  (``offload=True``) or to the cache on disk.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from ..errors import ConfigError

__all__ = ["stats_nbytes", "layer_slices"]


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


def layer_slices(model: nn.Module, budget_bytes: int, *, stats: Iterable[str] = ("cx", "cg"),
                 dtype: torch.dtype = torch.float32, groups=None) -> list[list]:
    """Split the targeted groups into consecutive slices whose statistics fit ``budget_bytes``.

    Returns a list of ``LinearGroup`` lists; calibrate each with ``groups=slice`` (one
    forward+backward over the data per slice) and join the results with
    :meth:`Statistics.merge`. Raises ``ValueError`` naming the group that alone exceeds the budget.
    """
    groups, lin = _resolve_groups(model, groups)
    st = set(stats)
    out: list[list] = [[]]
    used = 0
    for g in groups:
        b = _group_nbytes(g, lin, st, dtype)
        if b > budget_bytes:
            raise ConfigError(f"layer_slices: the statistics of {g.key} alone need {b} bytes > budget {budget_bytes}")
        if used + b > budget_bytes and out[-1]:
            out.append([])
            used = 0
        out[-1].append(g)
        used += b
    return out
