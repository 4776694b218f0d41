"""The obdk checkpoint format: file names, ``quantization_config``, and the shard index read from the headers.

A compressed module ``<name>`` is stored as ``<name>.weight_a`` [r, in] and
``<name>.weight_b`` [out, r] (plus ``<name>.bias``), and ``<name>.weight`` as an
*empty* tensor (shape [0]): a tombstone, so that a loader that does not know obdk
(transformers without ``import obdk``, or with ``quantization_config`` deleted from
``config.json``) stops on a size mismatch instead of silently initialising that
Linear at random. ``config.json`` carries ``quantization_config`` with
``quant_method: "obdk"``, the format version, the obdk version, the rank of every
compressed module, the compression config and the calibration fingerprint
(:func:`quantization_config`); ``torch_dtype`` is the dtype of the factors. ``obdk_manifest.json``
lists every file obdk wrote (so a later save knows which files are its own).

:func:`tensor_index` is the one reader of a safetensors checkpoint's index (``model.safetensors``, or the shards
of ``model.safetensors.index.json``): every tensor's file, dtype and shape from the file headers alone. The
loader checks a checkpoint against it and the streamed passes read a skeleton's layers through it
(:class:`obdk.stream.shards.ShardedWeights`). This module reads files only; it depends on :mod:`obdk.errors`
and :mod:`obdk.config`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from .. import __version__
from ..config import FORMAT_VERSION
from ..errors import CheckpointError

QUANT_METHOD = "obdk"
SHARD_BYTES = 4 << 30
REPORT_FILE = "obdk_report.json"
MANIFEST_FILE = "obdk_manifest.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def nonfinite(t: torch.Tensor) -> str:
    """What is not finite in ``t``: e.g. ``"NaN/Inf in 3 of 4096 entries"``."""
    bad = ~torch.isfinite(t)
    kinds = [w for w, m in (("NaN", torch.isnan(t)), ("Inf", torch.isinf(t))) if bool(m.any())]
    return f"{'/'.join(kinds)} in {int(bad.sum())} of {t.numel()} entries"


def check_finite(name: str, t: torch.Tensor, file: Any, cast: Optional[torch.dtype] = None) -> None:
    """Raise :class:`CheckpointError` when tensor ``name`` (from ``file``) holds NaN/Inf."""
    from ..finite import all_finite
    if not all_finite(t):
        after = f" after the cast to {_dtype_name(cast)} (the values overflow it)" if cast is not None else ""
        raise CheckpointError(f"{file}: tensor {name!r} holds {nonfinite(t)}{after}; the checkpoint is corrupt"
                              + ("" if cast is None else " for this dtype; load it in its saved dtype"))


# --------------------------------------------------------------------------- quantization_config


def quantization_config(ranks: dict[str, int], config: Any, fingerprint: Optional[dict]) -> dict:
    """The ``quantization_config`` of ``config.json``: method, format and obdk versions, ``ranks`` {module: r},
    the compression ``config`` (a ``LowRankConfig`` or its dict) and the calibration ``fingerprint``."""
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "obdk_version": __version__,
        "ranks": dict(ranks),
        "config": config.to_dict() if hasattr(config, "to_dict") else config,
        "calibration": fingerprint,
    }


def _check_ranks(ranks: Any, where: str) -> dict[str, int]:
    if not isinstance(ranks, dict):
        raise CheckpointError(f"{where}: quantization_config.ranks missing or not a mapping")
    for name, r in ranks.items():
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"{where}: quantization_config.ranks has a non-string module name {name!r}")
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise CheckpointError(f"{where}: quantization_config.ranks[{name!r}] = {r!r} is not a positive integer")
    return ranks


def check_quantization_config(q: Any, where: str) -> dict:
    """Validate a ``quantization_config`` mapping (method, format version, ranks); ``where`` names the file."""
    if not isinstance(q, dict) or q.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{where}: quantization_config.quant_method is not {QUANT_METHOD!r}")
    ver = q.get("format_version")
    if isinstance(ver, bool) or not isinstance(ver, int) or ver < 1 or ver > FORMAT_VERSION:
        raise CheckpointError(f"{where}: quantization_config.format_version={ver!r} is unknown; "
                              f"this obdk {__version__} reads format versions 1..{FORMAT_VERSION}")
    _check_ranks(q.get("ranks"), where)
    return q


def _read_config_json(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: missing (not an obdk checkpoint directory)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({exc})") from exc
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_file}: not a JSON object")
    return cfg


def read_quantization_config(path: str | os.PathLike) -> dict:
    """The ``quantization_config`` of an obdk checkpoint dir; errors name the file and field."""
    path = Path(path)
    return check_quantization_config(_read_config_json(path).get("quantization_config"), str(path / "config.json"))


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
for _k, _a in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _a):
        _ST_DTYPES[_k] = getattr(torch, _a)


@dataclass
class TensorInfo:
    """Where a checkpoint tensor lives and what its header says."""
    file: Path
    dtype: Any  # torch.dtype, or the safetensors dtype string when torch has no equivalent
    shape: tuple


def _read_header(f: Path) -> dict:
    """The JSON header of safetensors file ``f``; errors name the file (missing, unreadable, truncated)."""
    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if size < 8 or n <= 0 or 8 + n > size:
                raise ValueError(f"header length {n} does not fit in {size} bytes")
            header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    except Exception as exc:
        raise CheckpointError(f"{f}: unreadable or truncated safetensors file ({exc})") from exc
    need = 8 + n + (max(ends) if ends else 0)
    if size < need:
        raise CheckpointError(f"{f}: truncated ({size} bytes, header says {need})")
    return header


def read_weight_map(index: Path) -> dict[str, str]:
    """``weight_map`` (tensor name → shard file name) of shard index ``index``; :class:`CheckpointError` naming it."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not a mapping")
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{index}: malformed shard index ({exc})") from exc
    return weight_map


def tensor_index(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Every tensor of checkpoint ``path`` (single file or shard index) from the file headers only."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = read_weight_map(index)
        files = sorted(set(weight_map.values()))
    else:
        files = [SINGLE_FILE]
        weight_map = None
    out: dict[str, TensorInfo] = {}
    for fname in files:
        f = path / fname
        if not f.is_file():
            raise CheckpointError(f"{f}: missing shard" + (f" (listed in {index.name})" if weight_map else ""))
        for k, v in _read_header(f).items():
            if k == "__metadata__":
                continue
            if k in out:
                raise CheckpointError(f"{f}: tensor {k!r} is also stored in {out[k].file.name}")
            out[k] = TensorInfo(f, _ST_DTYPES.get(v.get("dtype"), v.get("dtype")), tuple(v.get("shape", ())))
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(out))
        if missing:
            raise CheckpointError(f"{index}: tensors {missing[:5]} listed but not found in their shard files")
    return out


def factor_dtype(cfg: dict) -> Optional[torch.dtype]:
    """The factors' dtype recorded in ``config.json`` (``torch_dtype``, else ``dtype``), or None."""
    for key in ("torch_dtype", "dtype"):
        v = cfg.get(key)
        if isinstance(v, str) and isinstance(getattr(torch, v.removeprefix("torch."), None), torch.dtype):
            return getattr(torch, v.removeprefix("torch."))
    return None


def is_tombstone(name: str, info: TensorInfo, ranks: dict) -> bool:
    """``<module>.weight`` stored empty for a compressed ``<module>`` (see the module docstring)."""
    return name.endswith(".weight") and name[: -len(".weight")] in ranks and info.shape in ((0,), ())
