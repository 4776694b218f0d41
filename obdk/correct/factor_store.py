"""The factors of a streamed correction, kept layer by layer on host memory or in scratch safetensors files.

A streamed plan's correction (:func:`obdk.correct.steps.gradient_correct` with ``stream=``) takes each
layer's step as soon as that layer's gradients are final. Its results, every target's corrected factors,
are the compressed model: holding them in a dict would build the compressed model in memory before it is
written. :class:`FactorStore` keeps them one decoder layer at a time under the plan's
:class:`~obdk.stream.layer_files.HostBudget` (shared with its kept spectra, statistics and boundary buffers),
beyond it one safetensors file per layer in a private ``obdk-factors-*`` directory under ``scratch_dir``,
read back one layer at a time by the next step's pass, :meth:`obdk.pipeline.Plan.save` or
:meth:`~obdk.pipeline.Plan.apply`; the directory goes with :meth:`~FactorStore.free` or the store.
"""
from __future__ import annotations

from typing import Callable, Iterator, Mapping, Optional

from torch import Tensor

from ..errors import ConfigError
from ..stream.budget import HostBudget
from ..stream.layer_files import LayerFiles

__all__ = ["FactorStore"]


class FactorStore(LayerFiles, Mapping):
    """``{name: (a [r, n], b [m, r], predicted_loss)}`` kept one decoder layer at a time (module docstring).

    ``scratch_dir``, ``budget``: where layers go beyond the (shared) :class:`HostBudget`. :meth:`put_layer`
    copies a layer's factors to host memory or to its file; ``store[name]`` gives them back (CPU; a spilled
    layer is read from its file, the last one read cached, so a layer-by-layer walk reads each file once).
    Iteration follows the order the names were put. Counters: ``host_bytes``, ``spilled_bytes``,
    ``files_read``.
    """

    prefix = "obdk-factors-"

    def __init__(self, *, scratch_dir=None, budget: Optional[HostBudget] = None) -> None:
        super().__init__("FactorStore", None, scratch_dir, budget)
        self._where: dict[str, int] = {}
        self._pred: dict[str, float] = {}
        self._spec: dict[str, dict] = {}

    def put_layer(self, i: int, factors: Mapping[str, tuple]) -> None:
        """Keep decoder layer ``i``'s ``{name: (a [r, n], b [m, r], predicted_loss)}`` (copied to the host)."""
        i = int(i)
        if self._held(i):
            raise ConfigError(f"FactorStore: decoder layer {i}'s factors are already kept")
        tensors: dict[str, Tensor] = {}
        for n, (a, b, pred) in factors.items():
            if n in self._where:
                raise ConfigError(f"FactorStore: {n}'s factors are already kept")
            tensors[f"{n}/a"] = a.detach().to("cpu", copy=True).contiguous()
            tensors[f"{n}/b"] = b.detach().to("cpu", copy=True).contiguous()
            self._spec[n] = {f"{n}/a": (tuple(a.shape), a.dtype), f"{n}/b": (tuple(b.shape), b.dtype)}
        if not tensors:
            return
        for n, (_, _, pred) in factors.items():
            self._where[n] = i
            self._pred[n] = float(pred)
        self._keep(i, tensors, f"the corrected factors of decoder layer {i}")

    def __getitem__(self, name: str) -> tuple[Tensor, Tensor, float]:
        if name not in self._where:
            raise KeyError(name)
        t = self._tensors(self._where[name], f"{name}'s corrected factors", want=self._spec[name])
        return t[f"{name}/a"], t[f"{name}/b"], self._pred[name]

    def __contains__(self, name: object) -> bool:  # (Mapping's would read the factors)
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._where))

    def __len__(self) -> int:
        return len(self._where)

    def rank(self, name: str) -> int:
        """Target ``name``'s rank, without reading its factors."""
        return int(self._spec[name][f"{name}/a"][0][0])


class Truncations(Mapping):
    """``{name: (a [r, n], b [m, r], predicted_loss)}``: each target's truncation made when asked for, by
    ``truncate(name)`` (e.g. :meth:`obdk.pipeline.Plan.factors` at the allocated rank), so that a streamed
    correction reads one layer's truncations at a time instead of holding the compressed model."""

    def __init__(self, names: list[str], truncate: Callable[[str], tuple]) -> None:
        self._names, self._truncate = list(names), truncate
        self._set = set(self._names)

    def __getitem__(self, name: str) -> tuple[Tensor, Tensor, float]:
        if name not in self._set:
            raise KeyError(name)
        return self._truncate(name)

    def __contains__(self, name: object) -> bool:
        return name in self._set

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

