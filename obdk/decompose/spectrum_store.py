"""Every target's full spectrum kept after its layer is decomposed, on host memory or in scratch safetensors files.

A streamed :func:`~obdk.pipeline.prepare` decomposes each decoder layer as its sweep ends. Any ratio
still comes from one decomposition, so each target's eigenvalues (for the allocation) and its ordered
factors (``factor_b`` [m, k], ``factor_a`` [k, n], compute dtype: any rank is a slice) are kept until
:meth:`~obdk.pipeline.Plan.apply`. Kept whole on host they are several times the model (Llama-70B in
fp32: 382 GB). :class:`SpectrumStore` keeps the factors on host memory up to a byte budget (a
:class:`~obdk.stream.layer_files.HostBudget`, shared with the plan's kept statistics) and beyond it one
safetensors file per decoder layer in a private ``obdk-spectra-*`` directory under ``scratch_dir``
(default the system temporary directory), removed by :meth:`SpectrumStore.close` or when the store is
garbage-collected (a killed process leaves the directory). The eigenvalues and the metadata always stay
on host (``eigenvalues(name)``, ``meta(name)``): an allocation reads no file; a truncation walk in layer
order reads each layer's file once.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator, Mapping, Optional, Sequence

from torch import Tensor

from ..errors import ConfigError, DataError, NotCollectedError
from ..stream.budget import HostBudget
from ..stream.layer_files import LayerFiles
from .closed_form import Spectrum

__all__ = ["SpectrumStore"]

#: The fields of a Spectrum that are never stored: ``weight`` is the model's own parameter (reattached).
_NOT_STORED = ("weight", "eigenvalues")


def _own(t: Tensor) -> Tensor:
    """``t`` on the CPU, contiguous and owning its whole storage (a copy only where it is not: a device tensor,
    a strided one, a view into a batch), so that keeping it keeps nothing else alive and it can be saved."""
    t = t.detach()
    if t.device.type == "cpu" and t.is_contiguous() and t.storage_offset() == 0 and \
            t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.to("cpu", copy=True).contiguous()


class SpectrumStore(LayerFiles, Mapping):
    """A read-only ``Mapping[str, Spectrum]`` filled one decoder layer at a time (see the module docstring).

    ``max_host_memory`` / ``scratch_dir``: host bytes of factors before layers go to safetensors files in
    ``scratch_dir`` (None: all on host); or ``budget``, a :class:`~obdk.stream.layer_files.HostBudget` shared with
    other stores (a streamed plan's :class:`~obdk.stream.layer_files.LayerStatistics`), so that one
    ``max_host_memory`` bounds their sum. ``order``: the names in the order to iterate (a plan's targets in
    forward order); names not in it follow in the order they were put.

    :meth:`put_layer` takes layer ``i``'s ``{name: Spectrum}``: every tensor field but ``weight`` (a reference
    to the model's parameter, kept as such, never copied nor saved) and ``eigenvalues`` goes, as a CPU tensor,
    to host memory or the layer's file; factors on the ``meta`` device (a non-writer rank under
    ``torch.distributed``) are kept as shapes (0 bytes). ``eigenvalues`` [k] and the metadata (method, solver,
    damping, numerical_rank, rtol, kept, shape) stay on host: :meth:`eigenvalues`, :meth:`meta`. ``store[name]``
    is a full :class:`Spectrum` (factors on the CPU, read back from the layer's file when spilled; the last
    layer read is cached). Counters: ``host_bytes`` (factor bytes on host, within the budget),
    ``spilled_bytes``, ``peak_host_bytes``, ``files_read``, ``eigen_bytes`` (eigenvalues, outside the budget:
    8 bytes per component). Bad ``max_host_memory`` or a missing ``scratch_dir``: :class:`ConfigError`; a
    scratch file gone or corrupt: :class:`~obdk.errors.MissingFileError` / :class:`DataError` naming the file
    and the target.
    """

    prefix = "obdk-spectra-"

    def __init__(self, max_host_memory: Optional[int] = None, scratch_dir: Optional[str | os.PathLike] = None, *,
                 budget: Optional[HostBudget] = None, order: Optional[Sequence[str]] = None) -> None:
        super().__init__("SpectrumStore", max_host_memory, scratch_dir, budget)
        self._pos = {n: j for j, n in enumerate(order or ())}
        self._entries: dict[str, dict[str, Any]] = {}  # name -> {"layer", "cls", "fields", "eigenvalues", ...}
        self.eigen_bytes = 0
        self._closed = False
        self._released: set[int] = set()

    # ------------------------------------------------------------------ write
    def put_layer(self, i: int, spectra: Mapping[str, Spectrum]) -> None:
        """Keep decoder layer ``i``'s spectra ``{name: Spectrum}`` (factors copied to the CPU where they are not
        there; the caller may drop its spectra). Each layer once; an empty ``spectra`` keeps nothing."""
        i = int(i)
        self._check_open()
        if self._held(i) or any(e["layer"] == i for e in self._entries.values()):
            raise ConfigError(f"SpectrumStore: decoder layer {i}'s spectra were already kept")
        tensors: dict[str, Tensor] = {}
        entries: dict[str, dict[str, Any]] = {}
        for name, sp in spectra.items():
            if name in self._entries:
                raise ConfigError(f"SpectrumStore: {name}'s spectrum was already kept (layer "
                                  f"{self._entries[name]['layer']})")
            if not dataclasses.is_dataclass(sp) or not isinstance(getattr(sp, "eigenvalues", None), Tensor):
                raise DataError(f"SpectrumStore: {name} is not a Spectrum (got {type(sp).__name__})")
            fields, stored, meta_shaped = {}, {}, {}
            for f in dataclasses.fields(sp):
                if not f.init:
                    continue
                v = getattr(sp, f.name)
                if f.name in _NOT_STORED or not isinstance(v, Tensor):
                    fields[f.name] = v
                elif v.is_meta:
                    meta_shaped[f.name] = v
                else:
                    t = _own(v)
                    tensors[f"{name}/{f.name}"] = t
                    stored[f.name] = (tuple(t.shape), t.dtype)
            ev = fields.pop("eigenvalues").detach().to("cpu", copy=True)
            self.eigen_bytes += ev.numel() * ev.element_size()
            entries[name] = {"layer": i, "cls": type(sp), "fields": fields, "eigenvalues": ev, "stored": stored,
                             "meta_shaped": meta_shaped}
        if tensors:
            self._keep(i, tensors, f"decoder layer {i}'s spectra ({', '.join(entries)})")
        del tensors
        self._entries.update(entries)

    # ------------------------------------------------------------------ read
    def _check_open(self) -> None:
        if self._closed:
            raise ConfigError("SpectrumStore: closed (Plan.close() or SpectrumStore.close() released every spectrum "
                              "and its scratch files); prepare the plan again")

    def _entry(self, name: str) -> dict[str, Any]:
        self._check_open()
        e = self._entries.get(name)
        if e is None:
            raise NotCollectedError(f"SpectrumStore: no spectrum of {name!r} was kept (have {len(self._entries)} "
                                    f"targets, e.g. {list(self._entries)[:3]})")
        return e

    def eigenvalues(self, name: str) -> Tensor:
        """Target ``name``'s eigenvalues [k] (fp64, CPU, descending, loss units), read without any file."""
        return self._entry(name)["eigenvalues"]

    def meta(self, name: str) -> dict[str, Any]:
        """Target ``name``'s metadata, without any file: ``method``, ``solver``, ``damping`` ({"cx": α, "cg": α}),
        ``numerical_rank``, ``rtol``, ``kept``, ``shape`` (m, n), ``layer`` (its decoder layer) and
        ``spilled`` (whether its factors are in a scratch file)."""
        e = self._entry(name)
        out = {k: v for k, v in e["fields"].items() if k != "weight"}
        out["damping"] = dict(out.get("damping") or {})
        out.update(shape=tuple(e["fields"]["weight"].shape), layer=e["layer"], spilled=e["layer"] in self._files)
        return out

    def layer_of(self, name: str) -> int:
        """The decoder layer whose spectra hold target ``name``."""
        return self._entry(name)["layer"]

    @property
    def layers(self) -> list[int]:
        """Decoder layer indices held, ascending."""
        return sorted({e["layer"] for e in self._entries.values()})

    def __getitem__(self, name: str) -> Spectrum:
        self._check_open()
        if name not in self._entries:
            raise KeyError(name)  # (Mapping's contract: ``in`` and ``get`` rely on it)
        e = self._entries[name]
        if e["layer"] in self._released:
            raise ConfigError(f"SpectrumStore: {name}'s factors (decoder layer {e['layer']}) were released once "
                              f"written (Plan.save(..., release=True)); prepare the plan again to cut another rank")
        kw = {k: dict(v) if isinstance(v, dict) else v for k, v in e["fields"].items()}  # (damping: a copy)
        kw.update(eigenvalues=e["eigenvalues"], **e["meta_shaped"])
        if e["stored"]:
            i = e["layer"]
            want = {f"{name}/{f}": sw for f, sw in e["stored"].items()}
            got = self._tensors(i, f"{name}'s factors (decoder layer {i})", want)
            kw.update({f: got[key] for key, f in zip(want, e["stored"])})
        return e["cls"](**kw)

    def __iter__(self) -> Iterator[str]:
        big = len(self._pos)
        put = {n: j for j, n in enumerate(self._entries)}
        return iter(sorted(put, key=lambda n: (self._pos.get(n, big), put[n])))

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __repr__(self) -> str:
        return (f"SpectrumStore({len(self)} targets in {len(self.layers)} layers, host_bytes={self.host_bytes}, "
                f"spilled_bytes={self.spilled_bytes}, files_read={self.files_read})")

    def release_layer(self, i: int) -> int:
        """Release decoder layer ``i``'s factors (host bytes back to the budget, its scratch file removed) while the
        eigenvalues and metadata stay: the allocation and the report still read them, a truncation of the layer
        raises :class:`ConfigError`. For a last walk that is done with each layer as it goes
        (:meth:`~obdk.pipeline.Plan.save` with ``release=True``: the scratch shrinks as the checkpoint grows).
        Returns the bytes released."""
        i = int(i)
        self._check_open()
        self._released.add(i)
        return self._release(i)

    def close(self) -> None:
        """Release every layer's factors (host bytes back to the budget) and remove the scratch directory; the
        store is empty afterwards, and reading or filling it raises :class:`ConfigError`."""
        self._entries.clear()
        self.eigen_bytes = 0
        self._closed = True
        self.free()
