"""The layer-streamed runtime, used by every room whose passes stream (calibration, decompositions, corrections).

* :mod:`~obdk.stream.options`: :class:`Streaming`, how a streamed plan's passes run;
* :mod:`~obdk.stream.budget`: :class:`HostBudget`, the one byte budget of host memory they share;
* :mod:`~obdk.stream.scratch`: :class:`~obdk.stream.scratch.ScratchStore`, the one base of every store that spills
  to scratch, and the registry of the live ones; :mod:`~obdk.stream.layer_files` (per-layer safetensors files)
  and :mod:`~obdk.stream.boundary` (boundary activations) are its stores;
* :mod:`~obdk.stream.shards`: a checkpoint read one tensor at a time, and the skeleton (:func:`load_skeleton`);
* :mod:`~obdk.stream.placement`: one decoder layer on the compute device at a time;
* :mod:`~obdk.stream.capture` and :mod:`~obdk.stream.sweep`: the layer sweep and its hooks;
* :mod:`~obdk.stream.distributed`: the windows sharded over ``torch.distributed`` ranks, the owner reduce and the
  transfers of spectra and factors.

It depends on :mod:`obdk.errors`, :mod:`obdk.models`, and the leaves :mod:`obdk.io.format` (the shard index) and
:mod:`obdk.decompose.roots` (``all_finite``); never on the rooms that use it.
"""
from .budget import HostBudget
from .options import Streaming

__all__ = ["HostBudget", "Streaming", "load_skeleton"]


def __getattr__(name: str):
    if name == "load_skeleton":  # (transformers: imported on first use)
        from .shards import load_skeleton
        return load_skeleton
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
