"""obdk checkpoints, one job per module:

* :mod:`obdk.io.format`: file names, ``quantization_config``, the shard index read from the file headers;
* :mod:`obdk.io.atomic`: what an output directory may be, the atomic swap and the recovery after a crash;
* :mod:`obdk.io.writer`: :class:`CheckpointWriter` (tensor by tensor), :func:`write_model` (the one model →
  checkpoint routine) and :func:`save_pretrained`;
* :mod:`obdk.io.load`: :func:`load_pretrained` and every check a load runs.

The names below are importable from ``obdk.io`` itself; each module is imported on first use.
"""
from __future__ import annotations

import importlib

_WHERE = {
    "format": ("QUANT_METHOD", "SHARD_BYTES", "REPORT_FILE", "MANIFEST_FILE", "INDEX_FILE", "SINGLE_FILE", "TensorInfo",
               "tensor_index", "read_weight_map", "read_quantization_config", "check_quantization_config",
               "quantization_config", "factor_dtype", "is_tombstone", "check_finite"),
    "atomic": ("TMP_TAG", "OLD_TAG", "temporaries", "recover", "check_writable"),
    "writer": ("CheckpointWriter", "write_model", "save_pretrained", "lowrank_modules"),
    "load": ("load_pretrained", "install_lowrank", "check_tensors", "has_obdk_tensors", "update_report",
             "load_report"),
}
_MODULE_OF = {name: mod for mod, names in _WHERE.items() for name in names}
_ERRORS = ("CheckpointError", "OutputPathError")

__all__ = sorted(_MODULE_OF) + list(_ERRORS)


def __getattr__(name: str):
    if name in _MODULE_OF:
        val = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    elif name in _ERRORS:
        from .. import errors
        val = getattr(errors, name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = val
    return val
